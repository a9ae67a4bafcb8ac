from pathlib import Path

import pytest

from prefopt.config import ConfigError, RunConfig, load_config, parse_override

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs/tiny/dpo.yaml")


def test_yaml_values_reach_the_tree():
    cfg = load_config(TINY)
    assert cfg.algorithm.name == "dpo"
    assert cfg.train.max_steps == 20
    assert cfg.data.max_prompt_length == 48
    # Untouched fields keep their defaults.
    assert cfg.tracking.experiment == "tiny" != RunConfig().tracking.experiment


@pytest.mark.parametrize(
    ("text", "path", "value"),
    [
        ("train.lr=1e-4", ["train", "lr"], "1e-4"),  # YAML 1.1 keeps this a string ...
        ("train.lr=0.001", ["train", "lr"], 0.001),
        ("policy.num_workers=2", ["policy", "num_workers"], 2),
        ("policy.deepspeed.offload_param=true", ["policy", "deepspeed", "offload_param"], True),
        ("train.adam_betas=[0.9, 0.95]", ["train", "adam_betas"], [0.9, 0.95]),
        ("model.path=null", ["model", "path"], None),
        ("tracking.run_name=my run", ["tracking", "run_name"], "my run"),
    ],
)
def test_parse_override_types_values(text, path, value):
    assert parse_override(text) == (path, value)


def test_overrides_are_typed_after_validation():
    cfg = load_config(TINY, ["train.lr=1e-4", "policy.num_workers=2", "train.adam_betas=[0.8,0.9]"])
    assert cfg.train.lr == pytest.approx(1e-4)  # ... and the float field accepts it
    assert cfg.policy.num_workers == 2
    assert cfg.train.adam_betas == (0.8, 0.9)


def test_bad_type_names_file_and_field_on_one_line():
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["train.lr=abc"])
    msg = str(err.value)
    assert "\n" not in msg
    assert TINY in msg and "train.lr" in msg and "'abc'" in msg


def test_misspelled_key_in_yaml_is_named_with_a_suggestion(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learning_rat: 0.1\n  max_steps: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "train.learning_rat" in msg and "unknown key" in msg
    misspelled = tmp_path / "typo.yaml"
    misspelled.write_text("algorithm:\n  betta: 0.2\n")
    with pytest.raises(ConfigError, match=r"algorithm\.betta: unknown key; did you mean 'beta'"):
        load_config(misspelled)


def test_misspelled_alias_names_our_key(tmp_path):
    # README's example: a misspelling of Hugging Face's name is too far from 'lr' for difflib
    # alone, so the known aliases (learning_rate -> lr) are matched too.
    path = tmp_path / "my.yaml"
    path.write_text("data: {task: imdb_sentiment}\ntrain:\n  lerning_rate: 1e-4\n")
    with pytest.raises(ConfigError, match=r"my\.yaml: train\.lerning_rate: unknown key; did you mean 'lr'\? "
                                          r"\(allowed: lr, gradient_accumulation_steps, "):
        load_config(path)
    with pytest.raises(ConfigError, match=r"train\.logging_steps: unknown key; did you mean 'log_steps'"):
        load_config(TINY, ["train.logging_steps=5"])
    # An alias whose key lives in another section suggests nothing wrong in this one.
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["train.max_grad_norm=1.0"])
    assert "gradient_clipping" not in str(err.value).split("(allowed")[0]


def test_the_config_reads_loss_names_without_the_loss_mathematics():
    # prefopt.losses.names declares the names and ranges without torch: loading and validating
    # a config (what every CLI command does first) must not import torch.
    import subprocess
    import sys

    code = ("import sys; from prefopt.config import load_config; "
            f"load_config({TINY!r}, ['algorithm.name=gpo', 'algorithm.score=avg_logp']); "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_loss_names_and_functions_agree():
    from prefopt.losses import GPO_FUNCTIONS, names, registry

    assert set(registry._FUNCTIONS) == set(names.LOSSES)
    assert tuple(GPO_FUNCTIONS) == names.GPO_FUNCTION_NAMES


def test_unknown_section_is_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"trainer: unknown key; did you mean 'train'"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "field", "says"),
    [
        ("policy.num_workers=0", "policy.num_workers", "greater than or equal to 1"),
        ("train.lr=-1", "train.lr", "greater than 0"),
        ("algorithm.name=dpoo", "algorithm", "did you mean 'dpo'"),
        ("policy.deepspeed.zero_stage=4", "policy.deepspeed.zero_stage", "less than or equal to 3"),
        ("algorithm.label_smoothing=0.5", "algorithm", "label_smoothing must be in [0, 0.5)"),
        ("data.max_prompt_length=1000", "data", "max_prompt_length must be smaller"),
        ("policy.deepspeed.offload_param=true", "policy.deepspeed", "needs zero_stage 3"),
    ],
)
def test_out_of_range_values_say_what_is_allowed(override, field, says):
    overrides = [override] + (["policy.deepspeed.zero_stage=2"] if "offload_param" in override else [])
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert f": {field}: " in str(err.value)
    assert says in str(err.value)


def test_setting_inside_a_value_is_refused():
    with pytest.raises(ConfigError, match=r"train\.lr is a value, not a section"):
        load_config(TINY, ["train.lr.x=1"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected section.field=value"):
        load_config(TINY, ["train.lr"])
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  lr: [0.1\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: line \d+: not valid YAML"):
        load_config(path)


def test_every_shipped_config_validates():
    from prefopt.sweep.spec import is_sweep_file, load_sweep

    configs = sorted((ROOT / "configs").rglob("*.yaml"))
    assert configs, "no configs found"
    sweeps = [p for p in configs if is_sweep_file(p)]
    assert sweeps, "no sweep files found"
    for path in configs:
        if path in sweeps:  # every trial of a shipped sweep has a valid config
            assert all(t.error is None for t in load_sweep(path).trials), path
        else:
            load_config(path)


def test_yaml_round_trip_is_identity(tmp_path):
    cfg = load_config(TINY, ["train.lr=0.01", "policy.num_workers=2"])
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(cfg.to_yaml())
    assert load_config(dumped) == cfg


def test_loss_names_come_from_the_loss_library():
    from prefopt import losses

    for name in losses.LOSSES:  # every loss the library has is a valid algorithm.name, sft and kto included
        params = {"algorithm.name": name, "ref.mode": "cache"}
        load_config(None, [f"{k}={v}" for k, v in params.items()])
    with pytest.raises(ConfigError, match=r"algorithm: unknown loss 'dpx'; did you mean 'dpo'"):
        load_config(TINY, ["algorithm.name=dpx"])


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("cluster.num_workers=2", "cluster.num_workers moved to policy.num_workers"),
        ("train.micro_batch_size=2", "train.micro_batch_size moved to policy.micro_batch_size"),
        ("deepspeed.zero_stage=3", "section deepspeed moved to policy.deepspeed"),
        ("ref.num_replicas=2", "ref.num_replicas moved to ref.num_workers"),
        ("ref.offload=true", "ref.offload moved to ref.deepspeed.offload_param"),
    ],
)
def test_moved_keys_name_their_new_place(override, says):
    with pytest.raises(ConfigError, match=says):
        load_config(TINY, [override])


def test_rules_across_sections_are_checked_at_load():
    with pytest.raises(ConfigError, match=r"algorithm.name=dpo needs a reference model, but ref.mode is none"):
        load_config(TINY, ["ref.mode=none"])
    load_config(TINY, ["ref.mode=none", "algorithm.name=simpo", "algorithm.beta=2.0"])  # reference-free: fine
    with pytest.raises(ConfigError, match="ref.mode=live with ref.deepspeed.zero_stage 3 on several ranks"):
        load_config(TINY, ["ref.mode=live", "ref.num_workers=2", "ref.deepspeed.zero_stage=3"])
    # The reference takes the policy's resources unless it names its own.
    cfg = load_config(TINY, ["policy.cpus_per_worker=2", "policy.micro_batch_size=3", "ref.micro_batch_size=8"])
    assert (cfg.reference.cpus_per_worker, cfg.reference.micro_batch_size) == (2, 8)
    assert cfg.reference.deepspeed.zero_stage == 0  # a frozen copy unless its parameters are offloaded
    # Scoring batches: a role's own score_batch_size, else its own micro_batch_size (not the policy's).
    cfg = load_config(TINY, ["policy.micro_batch_size=3", "policy.score_batch_size=16", "ref.micro_batch_size=8",
                             "critic.score_batch_size=32"])
    assert (cfg.policy.score_batch, cfg.reference.score_batch, cfg.critic_role.score_batch,
            cfg.reward_role.score_batch) == (16, 8, 32, 3)


def test_loss_params_are_checked_by_the_loss_library():
    from prefopt.losses import resolve_params

    cfg = load_config(TINY, ["algorithm.name=gpo", "algorithm.function=hinge", "algorithm.score=avg_logp"])
    assert resolve_params("gpo", **cfg.algorithm.loss_params())["function"] == "hinge"
    # A parameter the chosen loss does not take fails at load time, naming the section.
    with pytest.raises(ConfigError, match=r"algorithm: loss 'dpo' does not take parameter 'gamma'"):
        load_config(TINY, ["algorithm.name=dpo", "algorithm.gamma=1.0"])
    with pytest.raises(ConfigError, match="loss 'sft' does not take parameter 'beta'"):
        load_config(TINY, ["algorithm.name=sft"])  # the tiny DPO config sets beta


def test_the_tiny_configs_share_one_evaluation():
    """Points of different tiny configs lie on one reward-KL plane only if they were evaluated
    alike: same prompts, sampler and samples per prompt (when to evaluate may differ)."""
    sampled = {}
    for path in sorted((ROOT / "configs" / "tiny").glob("*.yaml")) + [ROOT / "prefopt" / "demo.yaml"]:
        cfg = load_config(path)
        if cfg.data.task is not None and cfg.algorithm.name != "reward_model":
            sampled[path.name] = cfg.eval.model_dump(exclude={"every_steps"})
    assert len(sampled) >= 9
    assert len({str(v) for v in sampled.values()}) == 1, sampled

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
        ("cluster.num_workers=2", ["cluster", "num_workers"], 2),
        ("deepspeed.offload_param=true", ["deepspeed", "offload_param"], True),
        ("train.adam_betas=[0.9, 0.95]", ["train", "adam_betas"], [0.9, 0.95]),
        ("model.path=null", ["model", "path"], None),
        ("tracking.run_name=my run", ["tracking", "run_name"], "my run"),
    ],
)
def test_parse_override_types_values(text, path, value):
    assert parse_override(text) == (path, value)


def test_overrides_are_typed_after_validation():
    cfg = load_config(TINY, ["train.lr=1e-4", "cluster.num_workers=2", "train.adam_betas=[0.8,0.9]"])
    assert cfg.train.lr == pytest.approx(1e-4)  # ... and the float field accepts it
    assert cfg.cluster.num_workers == 2
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


def test_unknown_section_is_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"trainer: unknown key; did you mean 'train'"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "field", "says"),
    [
        ("cluster.num_workers=0", "cluster.num_workers", "greater than or equal to 1"),
        ("train.lr=-1", "train.lr", "greater than 0"),
        ("algorithm.name=dpoo", "algorithm.name", "'dpo'"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage", "less than or equal to 3"),
        ("algorithm.label_smoothing=0.5", "algorithm.label_smoothing", "less than 0.5"),
        ("data.max_prompt_length=1000", "data", "max_prompt_length must be smaller"),
        ("deepspeed.offload_param=true", "deepspeed", "needs zero_stage 3"),
    ],
)
def test_out_of_range_values_say_what_is_allowed(override, field, says):
    overrides = [override] + (["deepspeed.zero_stage=2"] if "offload_param" in override else [])
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
    configs = sorted((ROOT / "configs").rglob("*.yaml"))
    assert configs, "no configs found"
    for path in configs:
        load_config(path)


def test_yaml_round_trip_is_identity(tmp_path):
    cfg = load_config(TINY, ["train.lr=0.01", "cluster.num_workers=2"])
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(cfg.to_yaml())
    assert load_config(dumped) == cfg


def test_config_and_loss_library_agree_on_loss_names():
    from prefopt import config, losses

    assert set(config.PAIRWISE_LOSSES) == set(losses.PAIRWISE_LOSSES)
    assert set(config.ALGORITHMS) - set(config.PAIRWISE_LOSSES) == {*losses.UNPAIRED_LOSSES, "sft"}


def test_loss_params_are_checked_by_the_loss_library():
    from prefopt.losses import resolve_params

    cfg = load_config(TINY, ["algorithm.name=gpo", "algorithm.function=hinge", "algorithm.score=avg_logp"])
    assert resolve_params("gpo", **cfg.algorithm.loss_params())["function"] == "hinge"
    # A parameter the chosen loss does not take fails at load time, naming the section.
    with pytest.raises(ConfigError, match=r"algorithm: loss 'dpo' does not take parameter 'gamma'"):
        load_config(TINY, ["algorithm.name=dpo", "algorithm.gamma=1.0"])
    with pytest.raises(ConfigError, match="sft takes no loss parameters"):
        load_config(TINY, ["algorithm.name=sft"])  # the tiny DPO config sets beta

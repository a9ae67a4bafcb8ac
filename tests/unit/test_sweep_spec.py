"""What a sweep is: grids, sweep files, seeds and trial ids (prefopt.sweep.spec), and what a trial
reserves (prefopt.algorithm_spec.trial_bundles). No Ray: the declaration alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from prefopt.algorithm_spec import trial_bundles
from prefopt.config import RunConfig
from prefopt.sweep.spec import SEED_FIELDS, SweepError, load_sweep, parse_grid

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny"


def test_parse_grid_types_values_as_set_does():
    assert parse_grid("algorithm.beta=0.05,0.1,1") == ("algorithm.beta", [0.05, 0.1, 1])
    assert parse_grid("algorithm.name=dpo,ipo") == ("algorithm.name", ["dpo", "ipo"])
    with pytest.raises(SweepError, match="expected section.field=value1,value2"):
        parse_grid("algorithm.beta")
    with pytest.raises(SweepError, match="no values"):
        parse_grid("algorithm.beta=")


def test_a_run_config_and_two_axes_make_the_product_times_the_seeds(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sweep = load_sweep(TINY / "dpo.yaml", grids=["algorithm.beta=0.1,0.5", "train.lr=1e-4,1e-3"], seeds=3,
                       output_dir=str(tmp_path / "sw"))
    assert len(sweep.trials) == 2 * 2 * 3
    trial = next(t for t in sweep.trials if t.id == "dpo-beta=0.5-lr=1e-3-s2")
    cfg = trial.config
    assert cfg.algorithm.beta == 0.5 and cfg.train.lr == 1e-3
    assert cfg.train.seed == cfg.data.seed == cfg.ppo.sampling.seed == 2
    assert cfg.output_dir == f"{tmp_path}/sw/dpo-beta=0.5-lr=1e-3-s2"
    assert cfg.tracking.run_name == trial.id
    # Every trial logs where the base config would have: the store beside its output_dir (runs/).
    assert {t.config.tracking.uri for t in sweep.trials} == {f"sqlite:///{Path('runs').resolve()}/mlflow.db"}
    assert {t.config.tracking.experiment for t in sweep.trials} == {"tiny"}
    # The evaluation is not what the seed changes: every trial is evaluated alike.
    assert len({t.config.eval.model_dump_json() for t in sweep.trials}) == 1


def test_a_run_config_without_grid_or_seeds_is_refused_in_one_line():
    with pytest.raises(SweepError, match="is a run config: give at least one --grid"):
        load_sweep(TINY / "dpo.yaml")


def test_an_invalid_point_is_a_trial_with_its_error_not_a_refused_sweep(tmp_path):
    sweep = load_sweep(TINY / "dpo.yaml", grids=["algorithm.beta=0.1,-1"], output_dir=str(tmp_path))
    good, bad = sweep.trials
    assert good.config is not None and good.error is None
    assert bad.config is None and "beta must be > 0 (got -1.0)" in bad.error and "\n" not in bad.error
    assert sweep.valid_trials() == [good]


def test_a_sweep_file_gives_each_method_its_config_and_its_own_axis(tmp_path):
    spec = {
        "name": "cmp", "seeds": [3, 7], "set": {"train.max_steps": 7},
        "methods": {
            "dpo": {"config": str(TINY / "dpo.yaml"), "grid": {"algorithm.beta": [0.1, 1]}},
            "ppo": {"config": str(TINY / "ppo.yaml"), "set": {"eval.every_steps": 3},
                    "grid": {"ppo.kl_coef": [0.05]}},
        },
    }
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(spec))
    sweep = load_sweep(path)
    assert sweep.name == "cmp" and sweep.seeds == [3, 7]
    assert sweep.output_dir == "runs/sweeps/cmp"
    ids = sorted(t.id for t in sweep.trials)
    assert ids == ["dpo-beta=0.1-s3", "dpo-beta=0.1-s7", "dpo-beta=1-s3", "dpo-beta=1-s7",
                   "ppo-kl_coef=0.05-s3", "ppo-kl_coef=0.05-s7"]
    by_id = {t.id: t.config for t in sweep.trials}
    assert by_id["ppo-kl_coef=0.05-s7"].algorithm.name == "ppo"
    assert by_id["ppo-kl_coef=0.05-s7"].ppo.kl_coef == 0.05
    assert by_id["ppo-kl_coef=0.05-s7"].eval.every_steps == 3
    assert by_id["dpo-beta=1-s3"].eval.every_steps != 3  # a method's own set stays its own
    assert all(c.train.max_steps == 7 for c in by_id.values())
    # One experiment for the parent and every trial: the first method's.
    assert {c.tracking.experiment for c in by_id.values()} == {sweep.experiment}
    params = sweep.params()
    assert params["dpo.grid.algorithm.beta"] == "[0.1, 1]" and params["seeds"] == "[3, 7]"


def test_method_configs_are_found_beside_the_sweep_file(tmp_path):
    (tmp_path / "base.yaml").write_text((TINY / "dpo.yaml").read_text())
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"methods": {"m": {"config": "base.yaml",
                                                                        "grid": {"algorithm.beta": [0.2]}}}}))
    sweep = load_sweep(tmp_path / "s.yaml", seeds=2)
    assert [t.id for t in sweep.trials] == ["m-beta=0.2-s0", "m-beta=0.2-s1"]


@pytest.mark.parametrize(("spec", "message"), [
    ({"methods": {}}, "methods"),
    ({"methods": {"m": {"grid": {"algorithm.beta": []}}}}, "algorithm.beta: an axis needs at least one value"),
    ({"seeds": 0, "methods": {"m": {}}}, "at least one seed"),
    ({"seeds": [1, 1], "methods": {"m": {}}}, "seeds repeat"),
    ({"methods": {"m": {"config": "missing.yaml"}}}, "missing.yaml: no such config file"),
])
def test_a_bad_sweep_file_is_refused_naming_the_file_and_the_key(tmp_path, spec, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SweepError) as err:
        load_sweep(path)
    assert message in str(err.value)
    assert str(path) in str(err.value) or "missing.yaml" in str(err.value)


def test_a_repeated_value_on_an_axis_is_refused():
    with pytest.raises(SweepError, match="two trials are both named dpo-beta=0.1-s0"):
        load_sweep(TINY / "dpo.yaml", grids=["algorithm.beta=0.1,0.1"])


def test_seed_fields_are_fields_of_the_config():
    cfg = RunConfig.model_validate({"data": {"task": "imdb_sentiment"}})
    for dotted in SEED_FIELDS:
        node = cfg
        for part in dotted.split("."):
            node = getattr(node, part)
        assert isinstance(node, int)


def _cfg(**tree) -> RunConfig:
    return RunConfig.model_validate({"data": {"task": "imdb_sentiment"}} | tree)


def test_a_trial_reserves_one_bundle_per_rank_of_the_roles_alive_together():
    # DPO on a task: the policy (2 ranks) and the reference (1 rank, kept for the evaluation).
    bundles, slots = trial_bundles(_cfg(policy={"num_workers": 2}, ref={"num_workers": 1}))
    assert bundles == [{"CPU": 1.0}] * 3
    assert slots == {"policy": [0, 1], "reference": [2]}


def test_a_reference_that_only_fills_the_cache_reuses_the_policy_bundles(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    bundles, slots = trial_bundles(_cfg(data={"path": str(data), "task": None}, policy={"num_workers": 2},
                                        ref={"num_workers": 2}))
    assert bundles == [{"CPU": 1.0}] * 2
    assert slots == {"policy": [0, 1], "reference": [0, 1]}
    # A reference of another shape cannot: it gets bundles of its own.
    bundles, slots = trial_bundles(_cfg(data={"path": str(data), "task": None}, policy={"num_workers": 2},
                                        ref={"num_workers": 1, "cpus_per_worker": 2}))
    assert bundles == [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 2.0}]
    assert slots["reference"] == [2]


def test_a_ppo_trial_holds_policy_reference_and_critic():
    bundles, slots = trial_bundles(_cfg(algorithm={"name": "ppo"}, data={"task": "imdb_sentiment",
                                                                         "format": "prompt_only"}))
    assert set(slots) == {"policy", "reference", "critic"}
    assert sorted(i for ix in slots.values() for i in ix) == list(range(len(bundles)))


def test_prepare_stages_run_under_the_sweep_and_trials_name_their_outputs(tmp_path):
    recipe = ROOT / "configs" / "sweeps" / "dpo-paper-sentiment.yaml"
    sweep = load_sweep(recipe, output_dir=str(tmp_path / "sw"))
    stages = {s.name: s for s in sweep.prepare}
    assert list(stages) == ["sft", "samples", "pairs", "reward_model"]
    # Every stage's output lies under the sweep's folder, whatever its config said.
    assert {s.config.output_dir for s in stages.values()} == {f"{tmp_path}/sw/prepare/{n}" for n in stages}
    sft = f"{tmp_path}/sw/prepare/sft/model"
    assert stages["samples"].config.model.path == sft
    assert stages["pairs"].config.label.input_dir == f"{tmp_path}/sw/prepare/samples/generated"
    assert stages["reward_model"].config.data.path == f"{tmp_path}/sw/prepare/pairs/labelled/pairs.jsonl"
    by_method = {}
    for t in sweep.trials:
        by_method.setdefault(t.method, []).append(t.config)
    assert {m: len(c) for m, c in by_method.items()} == {"dpo": 12, "ppo_gt": 12, "ppo_rm": 12}
    assert all(c.model.path == sft for cs in by_method.values() for c in cs)  # one reference for all
    assert {c.reward.model_path for c in by_method["ppo_rm"]} == {f"{tmp_path}/sw/prepare/reward_model/model"}
    assert {c.reward.source for c in by_method["ppo_gt"]} == {"task"}
    # One evaluation for every method: their points share one plane.
    assert len({c.eval.model_dump_json(exclude={"every_steps", "limit_samples"})
                for cs in by_method.values() for c in cs}) == 1

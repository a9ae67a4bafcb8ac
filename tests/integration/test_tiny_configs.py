"""Every shipped tiny config trains on the built-in task; reference-free ones compute no reference cache,
and every run evaluates through the reference role (the KL of the reward-KL plane)."""

import io
import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from prefopt.algorithms.offline import train
from prefopt.config import load_config

ROOT = Path(__file__).resolve().parents[2]

# First-step loss with the policy equal to the reference (every log-ratio is 0):
#   dpo: -log sigmoid(0) = ln 2;  ipo: (0 - 1/(2*0.1))^2 = 25;  kto: 1 - sigmoid(0) = 0.5.
FIRST_LOSS = {"dpo": math.log(2), "ipo": 25.0, "kto": 0.5}
REFERENCE_FREE = {"simpo", "orpo", "sft"}


def reference_actors(ray) -> int:
    from ray.util.state import list_actors

    # Our own instance's dashboard: the state API would refuse to guess among several on the machine.
    address = "http://" + ray._private.worker.get_dashboard_url()
    return len(list_actors(address=address, filters=[("class_name", "=", "ReferenceWorker")], limit=1000))


@pytest.mark.parametrize("name", ["dpo", "ipo", "kto", "simpo", "orpo", "sft"])
def test_tiny_config_trains(name, tmp_path, tiny_model_dir, ray_local):
    cfg = load_config(ROOT / f"configs/tiny/{name}.yaml", [
        # output_dir one level down: the RefCache (beside output_dir) is this test's own, not a hit
        # left by another config of the same data.
        f"model.path={tiny_model_dir}", "data.num_examples=48", "train.max_steps=3", f"output_dir={tmp_path / 'run'}",
        "eval.num_prompts=4", "eval.sampling.max_new_tokens=4",
    ])
    before = reference_actors(ray_local)
    result = train(cfg, Console(file=io.StringIO()))
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and all(math.isfinite(m["loss"]) for m in metrics)
    if name in FIRST_LOSS:
        assert metrics[0]["loss"] == pytest.approx(FIRST_LOSS[name], abs=1e-4)
        # ... and every reward β·(π − r) is 0 there; three steps later the policy has left its reference.
        first, last = metrics[0], metrics[-1]
        for key in ("rewards/chosen", "rewards/rejected"):
            assert first.get(key, 0.0) == pytest.approx(0.0, abs=1e-4), (key, first)
        assert max(abs(last.get(key, 0.0)) for key in ("rewards/chosen", "rewards/rejected")) > 1e-4, last
    assert metrics[-1]["loss"] != metrics[0]["loss"]
    # The exported policy is the trained one: every weight finite, and not the model it started from.
    from safetensors.torch import load_file

    started, trained = load_file(Path(tiny_model_dir) / "model.safetensors"), load_file(
        Path(result.model_dir) / "model.safetensors")
    assert started.keys() == trained.keys()
    assert all(t.isfinite().all() for t in trained.values())
    assert max((trained[k].float() - started[k].float()).abs().max().item() for k in started) > 0
    # One reference group per run, for the evaluation's KL (and the loss's cache where needed).
    assert reference_actors(ray_local) - before == cfg.ref.num_workers
    assert (tmp_path / "refcache").exists() == (name not in REFERENCE_FREE)
    assert {"eval/reward", "eval/kl", "eval/win_rate"} <= result.final_metrics.keys()
    assert 0.0 <= result.final_metrics["eval/reward"] <= 1.0
    # Each point with its standard error over prompts, and the evaluation's fingerprint on the run.
    m = result.final_metrics
    assert m["eval/kl_se"] > 0, m  # the log-ratios of different samples differ once the policy moved
    assert m["eval/reward_se"] >= 0 and 0 <= m["eval/win_rate_se"] <= 0.5, m
    from mlflow import MlflowClient

    from prefopt.tracking.store import resolve_tracking_uri

    tags = MlflowClient(resolve_tracking_uri(cfg)).get_run(result.run_id).data.tags
    assert len(tags["eval.fingerprint"]) == 16

"""A run that cannot work fails before anything expensive starts, in one line naming the field,
with the documented exit code and no traceback; a worker's error arrives as its own message;
a diverging run is stopped by the health guard."""

import io
import json
import socket
import time
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from prefopt.algorithms.offline import train
from prefopt.algorithms.stages import TrainingDiverged
from prefopt.cli import app
from prefopt.config import load_config

ROOT = Path(__file__).resolve().parents[2]
TINY_DPO = ROOT / "configs/tiny/dpo.yaml"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


CASES = {
    # name: (overrides, exit code, what the one line must say)
    "tracking server unreachable": ([f"tracking.uri=http://127.0.0.1:{closed_port()}"], 4,
                                    "tracking.uri: no MLflow server answers at http://127.0.0.1:"),
    "a GPU on a CPU-only machine": (["policy.gpus_per_worker=1"], 3,
                                    "policy.gpus_per_worker=1 but no node of the cluster has a GPU"),
    "a bundle larger than every node": (["policy.cpus_per_worker=4096"], 2,
                                        "policy.cpus_per_worker=4096 but this machine has"),
    "fp16 on a CPU": (["model.dtype=float16"], 2, "model.dtype: float16 needs GPUs"),
    "a model path that does not exist": (["model.path=/nonexistent/model"], 2,
                                         "model.path: /nonexistent/model is not a Hugging Face model directory"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_cannot_run_here_fails_in_one_line_before_anything_starts(name, tmp_path, tiny_model_dir, capsys):
    overrides, code, says = CASES[name]
    sets = [f"model.path={tiny_model_dir}", f"output_dir={tmp_path / 'run'}", *overrides]
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["train", str(TINY_DPO), *(a for s in sets for a in ("--set", s))])
    seconds = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n  {name}: exit {result.exit_code} after {seconds:.1f} s")
    assert result.exit_code == code, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], result.output
    assert "Traceback" not in result.output
    # Failed before the data was tokenized, the reference cache computed or a worker started.
    assert not (tmp_path / "run" / "data").exists() and not (tmp_path / "refcache").exists()


def test_a_workers_error_arrives_as_its_own_message(tiny_model_dir, tmp_path, ray_local):
    from prefopt.cluster.engine_worker import EngineWorker
    from prefopt.cluster.worker_group import ClusterError, WorkerGroup

    cfg = load_config(TINY_DPO, [f"model.path={tiny_model_dir}", f"output_dir={tmp_path}", "policy.num_workers=2"])
    group = WorkerGroup(EngineWorker, cfg.policy, cfg.cluster, name="policy", key="policy",
                        init_args=(cfg.model_dump_json(),))
    try:
        with pytest.raises(ClusterError) as err:
            group.call("build", str(tmp_path / "missing-model"), train=False)
    finally:
        group.shutdown()
    message = str(err.value)
    assert message.startswith("policy: rank ") and " failed in build: " in message
    assert "ray::" not in message and "Traceback" not in message  # the worker's words, not Ray's wrapping


def test_a_diverging_run_is_stopped_and_a_healthy_one_is_not(tmp_path, tiny_model_dir, ray_local):
    base = [f"model.path={tiny_model_dir}", "data.num_examples=64", "data.task=imdb_sentiment",
            "eval.every_steps=null", "eval.num_prompts=4", "eval.sampling.max_new_tokens=4", "train.save_steps=5",
            "train.max_steps=40", "policy.micro_batch_size=8", "train.health.patience=3"]
    # The largest learning rate the config allows, no clipping: the loss explodes.
    wild = load_config(TINY_DPO, base + [f"output_dir={tmp_path / 'wild'}", "train.lr=1.0",
                                         "policy.deepspeed.gradient_clipping=0"])
    with pytest.raises(TrainingDiverged, match=r"training stopped by the health guard at step \d+") as err:
        train(wild, Console(file=io.StringIO()))
    metrics = [json.loads(line) for line in (tmp_path / "wild" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) < 40
    stopped = metrics[-1]["step"]
    assert f"at step {stopped}" in str(err.value)
    assert "last good checkpoint" in str(err.value) or "no checkpoint was saved" in str(err.value)
    # No checkpoint of the diverged state was written.
    saved = [int(p.parent.name[4:]) for p in (tmp_path / "wild" / "checkpoints").glob("step*/trainer_state.json")]
    assert all(step < stopped for step in saved)

    healthy = load_config(TINY_DPO, base + [f"output_dir={tmp_path / 'healthy'}"])
    result = train(healthy, Console(file=io.StringIO()))
    assert result.steps == 40

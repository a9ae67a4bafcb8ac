"""The controller's stages that need no Ray: how steps are cut into calls, runs and resumes."""

import json
from pathlib import Path

import pytest

from prefopt.algorithms.stages import CHECKPOINTS, STATE_FILE, intervals, open_run
from prefopt.config import RunConfig


def test_calls_end_at_every_logging_saving_and_evaluation_point():
    assert intervals(0, 20, [10, 50, None]) == [(0, 10), (10, 10)]
    assert intervals(0, 12, [5, 4, None]) == [(0, 4), (4, 1), (5, 3), (8, 2), (10, 2)]
    assert intervals(7, 12, [5, 100, 3]) == [(7, 2), (9, 1), (10, 2)]  # a resume mid-interval
    assert intervals(3, 3, [1]) == []
    # Every step is run exactly once, whatever the periods.
    for start, end, every in [(0, 37, [4, 10, 7]), (5, 99, [1, None, 50]), (0, 1, [10])]:
        steps = [s for first, count in intervals(start, end, every) for s in range(first, first + count)]
        assert steps == list(range(start, end))


def test_resume_picks_the_newest_complete_checkpoint_and_trims_the_metrics(tmp_path):
    cfg = RunConfig(output_dir=str(tmp_path))
    for step, complete in [(10, True), (20, True), (30, False)]:  # step30 was being written when killed
        d = tmp_path / CHECKPOINTS / f"step{step}"
        d.mkdir(parents=True)
        if complete:
            (d / STATE_FILE).write_text(json.dumps({"step": step, "mlflow_run_id": f"run{step}"}))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 26)))
    run = open_run(cfg, resume=None)
    assert (run.start_step, run.mlflow_run_id) == (20, "run20")
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == list(range(1, 21))
    fresh = open_run(cfg, resume=False)
    assert fresh.checkpoint is None and not (tmp_path / CHECKPOINTS).exists()
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint"):
        open_run(cfg, resume=True)


def test_a_run_on_an_object_store_resumes_from_what_the_store_holds(s3, tmp_path, monkeypatch):
    import os

    from prefopt import storage
    from prefopt.algorithms.stages import METRICS_FILE, write_state
    from prefopt.storage import Store

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    uri = s3.bucket(f"b-{os.urandom(4).hex()}") + "/run"
    cfg = RunConfig(output_dir=uri)
    run = open_run(cfg, resume=None)
    assert run.checkpoint is None and (Store.at(uri) / "config.yaml").read_text() == cfg.to_yaml()
    assert run.local_dir == storage.local_dir_for(uri) and not Path("s3:").exists()
    (run.local_dir / METRICS_FILE).write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 5)))
    write_state(run, 4, {"mlflow_run_id": "r"})  # the log goes up before the state file
    (Store.at(uri) / CHECKPOINTS / "step8").delete()
    (Store.at(uri) / CHECKPOINTS / "step8" / "rng_rank0.pt").write_text("a half-written checkpoint")

    # Another machine (an empty local dir), later: the checkpoint and the log come from the store.
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "elsewhere"))
    again = open_run(cfg, resume=None)
    assert (again.start_step, again.mlflow_run_id) == (4, "r")
    assert again.local_dir != run.local_dir
    assert [json.loads(x)["step"] for x in (again.local_dir / METRICS_FILE).read_text().splitlines()] == [1, 2, 3, 4]
    assert str(again.checkpoint_dir("step4")) == f"{uri}/{CHECKPOINTS}/step4"
    fresh = open_run(cfg, resume=False)
    assert fresh.checkpoint is None and not (Store.at(uri) / CHECKPOINTS).exists()


def test_the_busy_cores_warning_counts_the_roles_that_compute_together(monkeypatch, tmp_path):
    import io
    import os

    from rich.console import Console

    from prefopt.algorithm_spec import spec_for
    from prefopt.algorithms.stages import preflight

    monkeypatch.setattr(os, "cpu_count", lambda: 2)

    def warned(roles: tuple[str, ...], **tree) -> bool:
        cfg = RunConfig.model_validate({"output_dir": str(tmp_path / "run"), **tree})
        # The algorithm's spec decides which roles start; check it is the set the case names.
        started = {r.name for r in spec_for(cfg).roles(cfg)} - {"policy", "reference"}
        assert started == set(roles)
        out = io.StringIO()
        preflight(cfg, Console(file=out, width=300), tracking=False)
        return "warning" in out.getvalue()

    ppo = {"algorithm": {"name": "ppo"}, "data": {"task": "imdb_sentiment"}}
    # Policy + critic update together (2), reference + critic score together (2): fits 2 cores.
    assert not warned(("critic",), **ppo)
    # A reward model scores beside the reference and the critic: 3 ranks on 2 cores.
    assert warned(("critic", "reward"), **ppo, reward={"source": "model", "model_path": str(tmp_path)})
    # Offline: a live reference computes beside the policy's 2 ranks.
    assert not warned((), policy={"num_workers": 2}, ref={"mode": "cache"})
    assert warned((), policy={"num_workers": 2}, ref={"mode": "live"})

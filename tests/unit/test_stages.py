"""The controller's stages that need no Ray: how steps are cut into calls, runs and resumes."""

import json

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

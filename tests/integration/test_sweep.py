"""`prefopt sweep` end to end: real Ray Tune on a local Ray, real DeepSpeed ranks, a real MLflow
store; each sweep is its own `prefopt` process, as a user runs it (and as a kill -9 reaches it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY_DPO = ROOT / "configs" / "tiny" / "dpo.yaml"
# Small and fast: 64 pairs, a few steps, an evaluation on 8 prompts of 8 tokens.
FAST = ["data.num_examples=64", "eval.num_prompts=8", "eval.sampling.max_new_tokens=8"]


def sweep_args(out: Path, grid: str, *sets: str, seeds: int = 1, output_dir: str | None = None) -> list[str]:
    args = [sys.executable, "-m", "prefopt", "sweep", str(TINY_DPO), "--grid", grid, "--seeds", str(seeds),
            "--output-dir", output_dir or str(out / "sweep")]
    for s in [*FAST, f"tracking.uri=sqlite:///{out}/mlflow.db", *sets]:
        args += ["--set", s]
    return args


def run(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    env = os.environ | {"DS_ACCELERATOR": "cpu", "COLUMNS": "200"}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def trial_runs(out: Path):
    """The parent run and the trials' runs of the one sweep in the store at `out`."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if r.data.tags.get("prefopt.sweep.parent") == "true"]
    trials = [r for r in runs if "prefopt.sweep.trial" in r.data.tags]
    return client, parents, trials


@pytest.fixture(scope="module")
def beta_sweep(tmp_path_factory):
    """2 β x 2 seeds of tiny DPO, and an impossible β (negative) with the same seeds."""
    out = tmp_path_factory.mktemp("beta-sweep")
    args = sweep_args(out, "algorithm.beta=0.1,0.5,-1", "train.max_steps=4", "eval.every_steps=2", seeds=2)
    return out, args, run(args)


def test_a_sweep_of_two_betas_and_two_seeds_is_four_nested_runs_under_one_parent(beta_sweep):
    out, _, proc = beta_sweep
    client, parents, trials = trial_runs(out)
    assert len(parents) == 1, proc.stdout + proc.stderr
    parent = parents[0]
    assert json.loads(parent.data.params["seeds"]) == [0, 1]
    assert json.loads(parent.data.params["dpo.grid.algorithm.beta"]) == [0.1, 0.5, -1]
    assert sorted(r.data.tags["prefopt.sweep.trial"] for r in trials) == [
        "dpo-beta=0.1-s0", "dpo-beta=0.1-s1", "dpo-beta=0.5-s0", "dpo-beta=0.5-s1"]
    for r in trials:
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.data.tags["prefopt.sweep"] == parent.data.tags["prefopt.sweep"]
        assert r.info.status == "FINISHED"
        point = json.loads(r.data.tags["prefopt.sweep.point"])
        assert float(r.data.params["algorithm.beta"]) == point["algorithm.beta"]
        assert r.data.params["train.seed"] == r.data.tags["prefopt.sweep.seed"]
        # Evaluated at steps 0, 2 and 4: a curve on the reward-KL plane.
        assert [m.step for m in client.get_metric_history(r.info.run_id, "eval/kl")] == [0, 2, 4]
    # Seeds differ: the two seeds of one β did not train the same.
    losses = {r.data.tags["prefopt.sweep.trial"]: r.data.metrics["loss"] for r in trials}
    assert losses["dpo-beta=0.1-s0"] != losses["dpo-beta=0.1-s1"]


def test_an_impossible_point_fails_alone_and_is_named_in_the_summary(beta_sweep):
    out, _, proc = beta_sweep
    assert proc.returncode == 6, proc.stdout + proc.stderr
    text = " ".join((proc.stdout + proc.stderr).split())
    for seed in (0, 1):
        assert f"failed dpo-beta=-1-s{seed}: " in text
    assert "beta must be > 0 (got -1.0)" in text
    assert "2 of 6 trials failed" in text
    for name in ("dpo-beta=0.1-s0", "dpo-beta=0.5-s1"):
        status = json.loads((out / "sweep" / name / "sweep-trial.json").read_text())
        assert status["status"] == "finished" and status["steps"] == 4


def test_compare_over_the_sweep_shows_every_trial(beta_sweep):
    out, _, _ = beta_sweep
    _, parents, _ = trial_runs(out)
    sweep_id = parents[0].data.tags["prefopt.sweep"]
    proc = run([sys.executable, "-m", "prefopt", "compare", "--sweep", sweep_id,
                "--tracking-uri", f"sqlite:///{out}/mlflow.db", "--out", str(out / "compare")], timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = (out / "compare" / "comparison.csv").read_text()
    for name in ("dpo-beta=0.1-s0", "dpo-beta=0.1-s1", "dpo-beta=0.5-s0", "dpo-beta=0.5-s1"):
        assert name in rows
    assert "sweep-" not in rows  # the parent run is not a trial


def test_the_same_command_again_skips_finished_trials(beta_sweep):
    out, args, _ = beta_sweep
    before = {p.name: p.stat().st_mtime_ns for p in (out / "sweep").glob("dpo-beta=0.*/sweep-trial.json")}
    proc = run(args)
    assert proc.returncode == 6  # the impossible point is still impossible
    assert "4 finished before" in " ".join(proc.stdout.split())
    _, parents, trials = trial_runs(out)
    assert len(parents) == 1 and len(trials) == 4  # no new run
    after = {p.name: p.stat().st_mtime_ns for p in (out / "sweep").glob("dpo-beta=0.*/sweep-trial.json")}
    assert after == before


def test_trials_beyond_the_machine_queue_and_a_killed_sweep_resumes(tmp_path):
    """3 trials of 2 ZeRO-3 ranks, on a local Ray that holds one at a time: they queue in Tune
    (a placement waiting 20 s, cluster.collective_timeout_s, would fail them). The driver is
    killed (-9) once a trial has finished and the next has a checkpoint; started again, the
    finished trial is skipped and the interrupted one resumes, its MLflow history without a
    duplicated step."""
    args = sweep_args(tmp_path, "algorithm.beta=0.1,0.2,0.3", "policy.num_workers=2", "train.max_steps=6",
                      "train.save_steps=2", "train.log_steps=1", "eval.every_steps=null",
                      "cluster.collective_timeout_s=20")
    sweep_dir = tmp_path / "sweep"
    env = os.environ | {"DS_ACCELERATOR": "cpu"}
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    finished = interrupted = None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and interrupted is None:
        time.sleep(0.5)
        done = [p.parent.name for p in sweep_dir.glob("*/sweep-trial.json")]
        started = [p.parents[2].name for p in sweep_dir.glob("*/checkpoints/step2/trainer_state.json")]
        if done and (rest := [name for name in started if name not in done]):
            finished, interrupted = done[0], rest[0]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert interrupted is not None, "no trial finished while another had a checkpoint"
    first_status = (sweep_dir / finished / "sweep-trial.json").read_text()

    again = run(args)
    assert again.returncode == 0, again.stdout + again.stderr
    text = " ".join(again.stdout.split())
    assert "finished before" in text
    assert (sweep_dir / finished / "sweep-trial.json").read_text() == first_status  # not run again
    assert "resumed from" in (sweep_dir / interrupted / "console.log").read_text()
    client, parents, trials = trial_runs(tmp_path)
    assert len(parents) == 1
    assert sorted(r.data.tags["prefopt.sweep.trial"] for r in trials) == [
        "dpo-beta=0.1-s0", "dpo-beta=0.2-s0", "dpo-beta=0.3-s0"]
    for r in trials:
        assert r.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "loss")]
        assert sorted(steps) == list(range(1, 7)), (r.data.tags["prefopt.sweep.trial"], steps)
    for name in ("dpo-beta=0.1-s0", "dpo-beta=0.2-s0", "dpo-beta=0.3-s0"):
        assert json.loads((sweep_dir / name / "sweep-trial.json").read_text())["status"] == "finished"


def test_a_trial_that_fails_while_running_is_named_with_its_one_line_error(tmp_path):
    """A point whose config is valid but cannot run (a model directory that is not there) fails in
    its trial, after Tune started it; the summary names it with the run's own one-line error."""
    args = sweep_args(tmp_path, f"model.path={tmp_path}/no-model", "train.max_steps=2")
    proc = run(args)
    assert proc.returncode == 6, proc.stdout + proc.stderr
    name = f"dpo-path={str(tmp_path / 'no-model').replace('/', '_')}-s0"
    status = json.loads((tmp_path / "sweep" / name / "sweep-trial.json").read_text())
    assert status["status"] == "failed" and "model.path" in status["error"]
    text = " ".join(proc.stdout.split())
    assert f"failed {name}: model.path" in text
    assert "Traceback" not in proc.stdout + proc.stderr


def test_a_sweep_on_an_object_store_keeps_every_trial_state_there(tmp_path, s3):
    from prefopt.algorithms.checkpoints import complete_checkpoints
    from prefopt.storage import Store

    bucket = s3.bucket(f"b-{os.urandom(4).hex()}")
    args = sweep_args(tmp_path, "algorithm.beta=0.1", "train.max_steps=2", output_dir=f"{bucket}/sweep")
    proc = run(args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    trial = Store.at(f"{bucket}/sweep/dpo-beta=0.1-s0")
    assert json.loads((trial / "sweep-trial.json").read_text())["status"] == "finished"
    assert [step for step, _, _ in complete_checkpoints(trial)] == [2]
    assert "parent_run_id" in json.loads(Store.at(f"{bucket}/sweep/sweep.json").read_text())
    again = run(args)
    assert again.returncode == 0 and "1 finished before" in " ".join(again.stdout.split())

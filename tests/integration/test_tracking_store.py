"""The Tracker on the embedded default, a real SQLite MLflow store in a temporary project."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from prefopt.config import RunConfig
from prefopt.tracking import Tracker


def config(project: Path, name: str = "a", **tree) -> RunConfig:
    return RunConfig.model_validate({"output_dir": str(project / "runs" / name), **tree})


def client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_runs_of_different_output_dirs_share_one_store(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # nothing may be written here (MLflow's default is ./mlruns)
    project = tmp_path / "project"
    ids = []
    for name, loss in (("a", "dpo"), ("b", "ipo")):
        with Tracker.start(config(project, name, algorithm={"name": loss},
                                  tracking={"experiment": "shared/exp"})) as tracker:
            tracker.log_config()
        ids.append(tracker.run_id)
    assert tracker.tracking_uri == f"sqlite:///{project}/runs/mlflow.db"
    assert list(cwd.iterdir()) == []

    c = client(tracker.tracking_uri)
    experiment = c.get_experiment_by_name("shared/exp")
    assert experiment.artifact_location == f"file://{project}/runs/mlartifacts/shared-exp"
    runs = c.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(ids)
    assert {r.data.tags["loss"] for r in runs} == {"dpo", "ipo"}
    for run_id in ids:
        saved = project / "runs" / "mlartifacts" / "shared-exp" / run_id / "artifacts"
        assert (saved / "config.yaml").is_file()
    assert sorted(p.name for p in (project / "runs").iterdir()) == ["mlartifacts", "mlflow.db"]


def test_run_name_given_or_generated(tmp_path):
    named = Tracker.start(config(tmp_path, tracking={"run_name": "sweep-beta-0.1"}))
    generated = Tracker.start(config(tmp_path, algorithm={"name": "simpo"}))
    for t in (named, generated):
        t.finish()
    c = client(named.tracking_uri)
    assert c.get_run(named.run_id).info.run_name == "sweep-beta-0.1"
    assert c.get_run(generated.run_id).info.run_name.startswith("simpo-20")


def test_status_follows_the_with_block(tmp_path):
    cfg = config(tmp_path)
    with Tracker.start(cfg) as ok:
        pass
    with pytest.raises(ValueError):
        with Tracker.start(cfg) as failed:
            raise ValueError("bad batch")
    with pytest.raises(KeyboardInterrupt):
        with Tracker.start(cfg) as killed:
            raise KeyboardInterrupt
    c = client(ok.tracking_uri)
    assert [c.get_run(t.run_id).info.status for t in (ok, failed, killed)] == [
        "FINISHED", "FAILED", "KILLED"]
    ok.finish("FAILED")  # already ended: nothing changes
    assert c.get_run(ok.run_id).info.status == "FINISHED"
    with pytest.raises(ValueError, match="status must be one of"):
        ok.finish("DONE")


def test_resume_on_sqlite_appends_metrics(tmp_path):
    cfg = config(tmp_path)
    first = Tracker.start(cfg)
    first.log_metrics({"loss": 1.0, "skipped": None}, step=10)
    first.finish("KILLED")
    again = Tracker.start(cfg, run_id=first.run_id)
    again.log_metrics({"loss": 0.5}, step=20)
    again.finish()
    c = client(cfg.tracking.uri or again.tracking_uri)
    history = sorted(c.get_metric_history(first.run_id, "loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(10, 1.0), (20, 0.5)]
    assert "skipped" not in c.get_run(first.run_id).data.metrics
    assert c.get_run(first.run_id).info.status == "FINISHED"


def test_model_dir_follows_log_model(tmp_path):
    model = tmp_path / "export"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with Tracker.start(config(tmp_path, tracking={"log_model": False})) as off:
        assert off.log_model_dir(model, register_as="ignored") is None
        with pytest.raises(FileNotFoundError, match="not a directory"):
            off.log_model_dir(tmp_path / "missing")
    with Tracker.start(config(tmp_path)) as on:
        assert on.log_model_dir(model) is None  # logged, not registered
        version = on.log_model_dir(model, register_as="local-model")
    c = client(on.tracking_uri)
    assert c.list_artifacts(off.run_id) == []
    assert [f.path for f in c.list_artifacts(on.run_id, "model")] == ["model/config.json"]
    assert str(version.version) == "1" and version.source.startswith("file://")
    assert c.get_registered_model("local-model").name == "local-model"


QUIET_SCRIPT = textwrap.dedent("""
    import json, socket, sys

    attempts = []  # every name looked up and every address connected to
    real_getaddrinfo = socket.getaddrinfo

    def lookup(host, *args, **kwargs):
        attempts.append(f"lookup {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self, address):
        attempts.append(f"connect {address!r}")
        raise OSError("network disabled by the test")

    socket.getaddrinfo = lookup
    socket.socket.connect = connect
    socket.socket.connect_ex = connect

    from prefopt.config import RunConfig
    from prefopt.tracking import Tracker
    from mlflow.telemetry import get_telemetry_client

    cfg = RunConfig.model_validate({"output_dir": sys.argv[1]})
    with Tracker.start(cfg) as tracker:
        tracker.log_config()
        tracker.log_metrics({"loss": 0.69, "eval/kl": float("nan")}, step=1)
        tracker.log_generations([{"prompt": "p", "completion": "c"}], step=1)
    json.dump({"attempts": attempts, "telemetry": get_telemetry_client() is not None},
              open(sys.argv[2], "w"))
""")


def test_default_store_is_quiet_and_offline(tmp_path):
    """A run on the default store prints nothing and opens no network connection."""
    report = tmp_path / "report.json"
    # Without the variables that already switch MLflow's telemetry off (our own, inherited from
    # this process, and the CI markers MLflow looks for), prefopt.tracking must do it itself.
    ci = {"PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "GITLAB_CI", "BUILDKITE", "TF_BUILD",
          "JENKINS_URL", "TRAVIS", "CIRCLECI", "DO_NOT_TRACK"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k not in ci}
    done = subprocess.run(
        [sys.executable, "-c", QUIET_SCRIPT, str(tmp_path / "runs" / "a"), str(report)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""
    assert json.loads(report.read_text()) == {"attempts": [], "telemetry": False}

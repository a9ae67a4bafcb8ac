"""A real `mlflow server` on 127.0.0.1 (random port, temporary store): runs logged over HTTP
are read back, and the default SQLite store opens in a real `mlflow ui`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from prefopt.config import RunConfig
from prefopt.tracking import Tracker, TrackingError
from prefopt.tracking.tracker import (
    TAG_DATA_FINGERPRINT,
    TAG_PARAMS_CHANGED,
    TAG_REFCACHE_FINGERPRINT,
    TAG_VERSION,
)

# No telemetry, and no background job runner (eight extra processes we do not need).
SERVER_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, *, data: dict | None = None, timeout: float = 10) -> bytes:
    body = None if data is None else json.dumps(data).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 directly
    with opener.open(request, timeout=timeout) as response:
        return response.read()


class MlflowProcess:
    """`mlflow server` or `mlflow ui` in its own process group, stopped with all its children."""

    def __init__(self, command: str, args: list[str], *, log: Path, cwd: Path) -> None:
        mlflow = Path(sys.executable).with_name("mlflow")
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = log
        port = self.url.rsplit(":", 1)[1]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [str(mlflow), command, *args, "--host", "127.0.0.1", "--port", port,
                 "--workers", "1"],
                cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **SERVER_ENV},
            )
        deadline = time.monotonic() + 240  # two shared cores: startup can be slow
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow {command} exited with {self.proc.returncode}:\n"
                            f"{log.read_text()[-3000:]}")
            try:
                if http_get(self.url + "/health", timeout=2) == b"OK":
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"mlflow {command} not healthy after 240 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    proc = MlflowProcess(
        "server",
        ["--backend-store-uri", f"sqlite:///{root}/server.db",
         "--artifacts-destination", str(root / "served-artifacts")],
        log=root / "server.log", cwd=root,
    )
    proc.root = root
    yield proc
    proc.stop()


def config(server, tmp_path, **tree) -> RunConfig:
    tracking = {"uri": server.url, **tree.pop("tracking", {})}
    return RunConfig.model_validate({"tracking": tracking, "output_dir": str(tmp_path / "out"),
                                     **tree})


def client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_run_over_http_reads_back(server, tmp_path):
    cfg = config(server, tmp_path,
                 tracking={"experiment": "http", "run_name": "tiny-dpo",
                           "register_model": "prefopt-tiny"},
                 algorithm={"name": "dpo", "beta": 0.1},
                 policy={"deepspeed": {"extra": {"note": "z" * 700}}})
    model_dir = tmp_path / "export"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "llama"}')
    weights = os.urandom(20_000)
    (model_dir / "model.safetensors").write_bytes(weights)
    losses = [0.6931, 0.65, 0.61, 0.58, 0.55]
    rows = [{"prompt": "The film", "completion": " was great", "reward": 0.9},
            {"prompt": "I felt", "completion": " bored", "reward": 0.1, "chosen": False}]

    with Tracker.start(cfg, tags={TAG_DATA_FINGERPRINT: "data-123"}) as tracker:
        tracker.log_config()
        for step, loss in enumerate(losses, start=1):
            tracker.log_metrics({"loss": loss, "rewards/margins": 0.1 * step,
                                 "tokens_per_second": 1000.0 + step}, step=step)
        tracker.log_metrics({"eval/kl": 0.5, "eval/reward": 0.7, "eval/win_rate": 0.6}, step=5)
        tracker.set_tags({TAG_REFCACHE_FINGERPRINT: "ref-456"})
        assert tracker.log_generations(rows, step=5) == "generations/step_0000005.json"
        version = tracker.log_model_dir(model_dir)
    assert tracker.run_url == f"{server.url}/#/experiments/{tracker.experiment_id}/runs/{tracker.run_id}"

    c = client(server.url)
    run = c.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-dpo"
    assert c.get_experiment(run.info.experiment_id).name == "http"
    # Params: the resolved config, flattened; an over-long value is cut, not refused.
    params = run.data.params
    assert params["algorithm.name"] == "dpo" and params["algorithm.beta"] == "0.1"
    assert params["train.lr"] == "0.0005" and params["tracking.uri"] == server.url
    assert len(params["policy.deepspeed.extra.note"]) == 500
    # Tags.
    tags = run.data.tags
    assert tags["algorithm"] == "offline" and tags["loss"] == "dpo"
    assert tags[TAG_VERSION] == __import__("prefopt").__version__
    assert tags[TAG_DATA_FINGERPRINT] == "data-123" and tags[TAG_REFCACHE_FINGERPRINT] == "ref-456"
    # Metrics: one point per logging step, under the names of docs/tracking.md.
    history = c.get_metric_history(tracker.run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == list(
        zip(range(1, 6), losses, strict=True))
    assert run.data.metrics["eval/reward"] == 0.7 and run.data.metrics["rewards/margins"] == 0.5

    # Artifacts went through the server into its artifacts destination, not to a local path.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    served = list((server.root / "served-artifacts").rglob("config.yaml"))
    assert len([p for p in served if tracker.run_id in str(p)]) == 1
    names = {f.path for f in c.list_artifacts(tracker.run_id)}
    assert names == {"config.yaml", "generations", "model"}
    got = Path(c.download_artifacts(tracker.run_id, "config.yaml", str(tmp_path)))
    assert got.read_text() == cfg.to_yaml()
    table = json.loads(Path(c.download_artifacts(
        tracker.run_id, "generations/step_0000005.json", str(tmp_path))).read_text())
    assert table["columns"] == ["step", "prompt", "completion", "reward", "chosen"]
    assert table["data"] == [[5, "The film", " was great", 0.9, None],
                             [5, "I felt", " bored", 0.1, False]]
    model = Path(c.download_artifacts(tracker.run_id, "model", str(tmp_path / "dl")))
    assert (model / "model.safetensors").read_bytes() == weights
    assert json.loads((model / "config.json").read_text()) == {"model_type": "llama"}

    # The registered model version points at the logged model directory.
    assert version is not None and version.run_id == tracker.run_id
    versions = c.search_model_versions("name='prefopt-tiny'")
    assert [(v.version, v.run_id) for v in versions] == [("1", tracker.run_id)]
    assert versions[0].source.endswith("/model")


def test_resumed_run_continues_the_same_mlflow_run(server, tmp_path):
    cfg = config(server, tmp_path, tracking={"experiment": "resume"})
    with pytest.raises(RuntimeError, match="node lost"):
        with Tracker.start(cfg) as first:
            first.log_config()
            first.log_metrics({"loss": 0.69}, step=1)
            first.log_metrics({"loss": 0.68}, step=2)
            raise RuntimeError("node lost")
    c = client(server.url)
    assert c.get_run(first.run_id).info.status == "FAILED"

    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 200})})
    with Tracker.start(longer, run_id=first.run_id) as again:
        assert again.run_id == first.run_id and again.resumed
        assert c.get_run(first.run_id).info.status == "RUNNING"
        again.log_config()  # a changed param must not make MLflow refuse the batch
        again.log_metrics({"loss": 0.60}, step=3)
        again.log_metrics({"loss": 0.55}, step=4)

    run = c.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    history = sorted(c.get_metric_history(first.run_id, "loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(1, .69), (2, .68), (3, .60), (4, .55)]
    assert run.data.params["train.max_steps"] == "100"  # params are immutable in MLflow
    assert run.data.tags[TAG_PARAMS_CHANGED] == "train.max_steps"
    assert "max_steps: 200" in Path(c.download_artifacts(
        first.run_id, "config.yaml", str(tmp_path))).read_text()
    experiment = c.get_experiment_by_name("resume")
    assert len(c.search_runs([experiment.experiment_id])) == 1

    with pytest.raises(TrackingError, match="cannot resume MLflow run 'f00'"):
        Tracker.start(cfg, run_id="f00")


def test_default_store_opens_in_mlflow_ui(tmp_path):
    """Training with the default URI leaves a store `mlflow ui --backend-store-uri` shows,
    artifacts included, from any working directory."""
    project = tmp_path / "project"
    project.mkdir()
    cfg = RunConfig.model_validate({"output_dir": str(project / "runs" / "dpo-a"),
                                    "tracking": {"experiment": "local"}})
    with Tracker.start(cfg) as tracker:
        tracker.log_config()
        tracker.log_metrics({"loss": 0.69, "eval/kl": 0.0, "eval/reward": 0.4}, step=0)
        tracker.log_generations([{"prompt": "a", "completion": "b"}], step=0)
    uri = tracker.tracking_uri
    assert uri == f"sqlite:///{project}/runs/mlflow.db"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ui = MlflowProcess("ui", ["--backend-store-uri", uri], log=tmp_path / "ui.log", cwd=elsewhere)
    try:
        api = ui.url + "/api/2.0/mlflow"
        experiment = json.loads(http_get(f"{api}/experiments/get-by-name?experiment_name=local"))
        found = json.loads(http_get(f"{api}/runs/search", data={
            "experiment_ids": [experiment["experiment"]["experiment_id"]]}))
        assert [r["info"]["run_id"] for r in found["runs"]] == [tracker.run_id]
        listed = json.loads(http_get(f"{api}/artifacts/list?run_id={tracker.run_id}"))
        assert {f["path"] for f in listed["files"]} == {"config.yaml", "generations"}
        config_text = http_get(f"{ui.url}/get-artifact?path=config.yaml&run_uuid={tracker.run_id}")
        assert config_text.decode() == cfg.to_yaml()
        assert b"<html" in http_get(ui.url + "/").lower()
    finally:
        ui.stop()


def test_tiny_training_run_logs_over_http(server, tmp_path, tiny_model_dir, ray_local):
    """The real trainer, 3 DPO steps on one rank, logging to the server over HTTP."""
    import io

    from rich.console import Console

    from prefopt.algorithms.offline import train
    from prefopt.config import load_config

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Film {i}:", "chosen": " great fun.", "rejected": " dull."}) + "\n"
                            for i in range(16)))
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs/tiny/dpo.yaml", [
        f"model.path={tiny_model_dir}", f"data.path={data}", "data.task=null", f"output_dir={tmp_path / 'run'}",
        "train.max_steps=3", "train.log_steps=1", f"tracking.uri={server.url}", "tracking.experiment=http-training",
    ])
    result = train(cfg, Console(file=io.StringIO()))
    c = client(server.url)
    run = c.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["algorithm.name"] == "dpo" and run.data.params["train.max_steps"] == "3"
    assert run.data.tags["loss"] == "dpo" and len(run.data.tags[TAG_DATA_FINGERPRINT]) >= 16
    losses = sorted(c.get_metric_history(result.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in losses] == [1, 2, 3]
    assert losses[0].value == pytest.approx(0.693147, abs=1e-4)
    for name in ("rewards/accuracies", "rewards/margins", "logps/chosen", "tokens_per_second"):
        assert len(c.get_metric_history(result.run_id, name)) == 3, name
    names = {f.path for f in c.list_artifacts(result.run_id)}
    assert {"config.yaml", "model"} <= names
    exported = {f.path for f in c.list_artifacts(result.run_id, "model")}
    assert "model/config.json" in exported and "model/model.safetensors" in exported

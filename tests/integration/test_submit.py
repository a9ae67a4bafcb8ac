"""`prefopt submit` and `prefopt job` against a real two-node Ray cluster on 127.0.0.1.

The cluster is separate processes (`ray start --head --block` and `ray start --address ... --block`)
with its own temp dir, free ports and token authentication on, so it clashes neither with the
in-process Ray of the other integration tests (tests/conftest.py ray_local) nor with any other
Ray on the machine; it is stopped by the ids of the processes it started, never by `ray stop`.
Every command runs as a CLI subprocess, as a user would run it, with the token in RAY_AUTH_TOKEN
and RAY_AUTH_MODE unset (the client sends it all the same).

The DPO run uses --no-working-dir: both nodes run the same .venv, where prefopt is installed, so
there is nothing to upload (faster); `job stop` runs on a job submitted with the repository as
its working dir, so the upload path runs against the real cluster too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from prefopt.cluster.worker_group import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TINY_DPO = ROOT / "configs/tiny/dpo.yaml"
VENV_BIN = Path(sys.executable).parent


# ----------------------------------------------------------------------------- the cluster


@dataclass
class LocalCluster:
    temp_dir: Path
    port: int
    dashboard_port: int
    token: str
    env: dict[str, str]  # what the nodes run with
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start_node(self, args: list[str], log: str) -> None:
        ports = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")
        with open(self.temp_dir / log, "wb") as out:
            self.procs.append(subprocess.Popen(
                [str(VENV_BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
                 f"--temp-dir={self.temp_dir}", "--disable-usage-stats", *args,
                 *(f"{p}={free_port()}" for p in ports)],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))

    def get(self, path: str, **params) -> dict | list:
        reply = requests.get(f"{self.url}{path}", params=params, timeout=15,
                             headers={"authorization": f"Bearer {self.token}"})
        reply.raise_for_status()
        return reply.json()

    def state(self, what: str) -> list[dict]:
        return self.get(f"/api/v0/{what}", limit=10000, timeout=10)["data"]["result"]["result"]

    def wait_nodes(self, n: int, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"ray start exited with {proc.returncode}: {self.logs()}")
            try:
                if sum(node["state"] == "ALIVE" for node in self.state("nodes")) >= n:
                    return
            except (requests.exceptions.RequestException, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} Ray node(s) not up after {timeout_s}s: {self.logs()}")
            time.sleep(0.5)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.temp_dir.glob("*.log")))

    def stop(self) -> None:
        """Kill what this cluster started: the `ray start` process groups, then any process left
        whose command line or environment names this cluster's temp dir (workers, job drivers)."""
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for _ in range(10):
            left = [pid for pid in pids_naming(str(self.temp_dir)) if pid != os.getpid()]
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if not left:
                break
            time.sleep(0.5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def pids_naming(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                seen = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
            except OSError:
                continue
            if text.encode() in seen:
                pids.append(int(entry.name))
    return pids


def torch_extensions_dir() -> Path:
    """DeepSpeed JIT-builds its CPU shm op into ~/.cache/torch_extensions/<python>/ under one name
    for every checkout, so two virtualenvs on one machine rebuild it in turn (35-90 s each on 2
    cores); a folder per virtualenv keeps this cluster's ranks on a built one."""
    key = hashlib.sha1(str(VENV_BIN).encode()).hexdigest()[:10]
    return Path.home() / ".cache" / "torch_extensions" / f"prefopt-{key}"


@pytest.fixture(scope="module")
def cluster():
    # A short temp dir: Ray's unix sockets live under it (at most 107 bytes a path). TMPDIR points
    # into it too, so that the job drivers' files (and processes) are found and removed with it.
    temp_dir = Path(tempfile.mkdtemp(prefix="pfr-", dir="/tmp"))
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0", TMPDIR=str(temp_dir),
               PYTHONUNBUFFERED="1", TORCH_EXTENSIONS_DIR=str(torch_extensions_dir()))
    c = LocalCluster(temp_dir, free_port(), free_port(), token, env)
    start = time.perf_counter()
    try:
        c.start_node(["--head", f"--port={c.port}", f"--dashboard-port={c.dashboard_port}",
                      "--dashboard-host=127.0.0.1", "--num-cpus=2", f"--ray-client-server-port={free_port()}"],
                     "head.log")
        c.wait_nodes(1)
        c.start_node([f"--address=127.0.0.1:{c.port}", "--num-cpus=2"], "worker.log")
        c.wait_nodes(2)
        print(f"\n  two-node cluster up in {time.perf_counter() - start:.1f} s")
        yield c
    finally:
        c.stop()


def prefopt(cluster: LocalCluster, *args: str, env: dict[str, str] | None = None,
            timeout: float = 600) -> tuple[subprocess.CompletedProcess, float]:
    """Run the CLI as a user would: the token in RAY_AUTH_TOKEN, RAY_AUTH_MODE unset."""
    base = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_MODE"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "prefopt", *args, "--address", cluster.url],
                          env=env if env is not None else base, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    return done, time.perf_counter() - start


def sets(*overrides: str) -> list[str]:
    return [a for s in overrides for a in ("--set", s)]


def one_error(output: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in output, output
    return errors[0]


def job_id_of(output: str) -> str:
    found = re.search(r"submitted job (prefopt-\S+) to", output)
    assert found, output
    return found.group(1)


def tiny_run(tmp_path: Path, model_dir: Path, *more: str) -> list[str]:
    return sets(f"model.path={model_dir}", "data.num_examples=32", "eval.every_steps=null", "eval.num_prompts=4",
                "eval.sampling.max_new_tokens=4", "train.log_steps=1", f"output_dir={tmp_path / 'run'}",
                f"tracking.uri=sqlite:///{tmp_path / 'store' / 'mlflow.db'}", "tracking.experiment=submitted",
                *more)


# ----------------------------------------------------------------------------- the tests


@dataclass
class Submitted:
    output: str
    seconds: float
    store: str  # the run's output_dir, on the S3 test server
    tracking_uri: str


# A run long enough that `job stop` lands between its first checkpoint and its end, with every
# piece of its state on the object store: the starting model, tokenized data, reference cache,
# checkpoints, log and export. The uninterrupted run of the resume test, too.
LONG_RUN = ("policy.num_workers=2", "cluster.placement_strategy=SPREAD", "train.max_steps=40", "train.save_steps=4")


def s3_run(tmp_path: Path, bucket: str, name: str, *more: str) -> list[str]:
    return sets(f"model.path={bucket}/tiny-model", "data.num_examples=32", "eval.every_steps=null",
                "eval.num_prompts=4", "eval.sampling.max_new_tokens=4", "train.log_steps=1",
                f"output_dir={bucket}/{name}", f"ref.cache_dir={bucket}/refcache",
                f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment=submitted", *more)


def cli_env(cluster: LocalCluster, s3) -> dict[str, str]:
    """The CLI's environment: the cluster's token, and the S3 server's address and credentials
    (which `prefopt submit` forwards to the job; the nodes themselves know nothing of them)."""
    return {**{k: v for k, v in cluster.env.items() if k != "RAY_AUTH_MODE"}, **s3.env}


@pytest.fixture(scope="module")
def bucket(s3, tiny_model_dir) -> str:
    from prefopt.storage import Store

    uri = s3.bucket("prefopt-runs")
    (Store.at(uri) / "tiny-model").upload(tiny_model_dir)
    return uri


@pytest.fixture(scope="module")
def uninterrupted(cluster, s3, bucket, tmp_path_factory) -> Submitted:
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    done, seconds = prefopt(cluster, "submit", str(TINY_DPO), "--wait", "--no-working-dir",
                            *s3_run(tmp_path, bucket, "whole", *LONG_RUN, "tracking.run_name=dpo-$HOME"),
                            env=cli_env(cluster, s3))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output + cluster.logs()
    return Submitted(output, seconds, f"{bucket}/whole", f"sqlite:///{tmp_path / 'mlflow.db'}")


def final_loss(store: str, step: int) -> float:
    from prefopt.storage import Store

    lines = [json.loads(line) for line in (Store.at(store) / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, step + 1))  # each step logged once, in order
    return lines[-1]["loss"]


def test_submit_wait_runs_dpo_on_two_nodes_with_its_state_on_the_object_store(cluster, uninterrupted, capsys):
    from prefopt.storage import Store

    with capsys.disabled():
        print(f"\n  submit --wait of a 40-step DPO run (2 policy ranks, state on S3): {uninterrupted.seconds:.1f} s")
    output = uninterrupted.output
    job_id = job_id_of(output)
    assert f"job {job_id} SUCCEEDED" in output
    assert "policy: 2 rank(s), ZeRO stage 3" in output  # streamed from the driver
    assert "--no-working-dir" not in output and "no code upload" in output

    # The two policy ranks were actors of this job, spread over both nodes.
    job = cluster.get(f"/api/jobs/{job_id}")
    ranks = [a for a in cluster.state("actors") if a["job_id"] == job["job_id"]
             and a.get("name", "").startswith("policy-rank")]
    assert sorted(a["name"].split("-")[1] for a in ranks) == ["rank0", "rank1"], ranks
    assert len({a["node_id"] for a in ranks}) == 2, ranks
    assert len({n["node_id"] for n in cluster.state("nodes") if n["state"] == "ALIVE"}) == 2

    # The run is in the store tracking.uri names, finished, with the config it ran.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uninterrupted.tracking_uri)
    experiment = client.get_experiment_by_name("submitted")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].info.run_name == "dpo-$HOME"  # the config arrived as written, no $ expanded
    params, metrics = runs[0].data.params, runs[0].data.metrics
    assert params["policy.num_workers"] == "2" and params["cluster.address"] == "auto"
    assert "loss" in metrics and "eval/reward" in metrics

    # Checkpoints (every rank's files, the state file last), the log and the export on the store.
    run = Store.at(uninterrupted.store)
    assert (run / "checkpoints").children() == [f"step{s}" for s in sorted(range(4, 41, 4), key=str)]
    files = [name for name, _, _ in (run / "checkpoints" / "step40").files()]
    for rank in (0, 1):
        assert f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in files and f"rng_rank{rank}.pt" in files
    assert json.loads((run / "checkpoints" / "step40" / "trainer_state.json").read_text())["step"] == 40
    assert (run / "model" / "config.json").is_file() and (run / "model" / "model.safetensors").is_file()
    assert (run / "config.yaml").is_file() and final_loss(uninterrupted.store, 40) > 0
    # The policy starts at its reference (the same tiny model): the first DPO loss is ln 2
    # (docs/losses.md, "Invariant"); 40 steps over 32 pairs bring it down.
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert final_loss(uninterrupted.store, 40) < first["loss"]


def test_a_stopped_job_submitted_again_resumes_from_the_store_to_the_same_loss(cluster, s3, bucket, uninterrupted,
                                                                              tmp_path, capsys):
    from prefopt.storage import Store

    config = s3_run(tmp_path, bucket, "stopped", *LONG_RUN)
    done, _ = prefopt(cluster, "submit", str(TINY_DPO), "--no-working-dir", *config, env=cli_env(cluster, s3))
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = job_id_of(done.stdout)
    checkpoints = Store.at(f"{bucket}/stopped") / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints / "step4" / "trainer_state.json").is_file():
        status = cluster.get(f"/api/jobs/{job_id}")["status"]
        assert status in ("PENDING", "RUNNING") and time.monotonic() < deadline, status + cluster.logs()
        time.sleep(0.2)
    stopped, _ = prefopt(cluster, "job", "stop", job_id, env=cli_env(cluster, s3))
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    saved = sorted(int(tag[4:]) for tag in checkpoints.children()
                   if (checkpoints / tag / "trainer_state.json").is_file())
    assert saved and saved[-1] < 40, f"the job finished before it was stopped: {saved}"

    again, seconds = prefopt(cluster, "submit", str(TINY_DPO), "--wait", "--no-working-dir", *config,
                             env=cli_env(cluster, s3))
    output = again.stdout + again.stderr
    with capsys.disabled():
        print(f"\n  stopped after step {saved[-1]}; the job submitted again resumed and ended in {seconds:.1f} s")
    assert again.returncode == 0, output + cluster.logs()
    assert f"resumed from {bucket}/stopped/checkpoints/step{saved[-1]} at step {saved[-1]}" in output
    assert final_loss(f"{bucket}/stopped", 40) == pytest.approx(final_loss(uninterrupted.store, 40), abs=1e-5)


def test_a_request_no_node_can_hold_fails_at_submission(cluster, tmp_path, tiny_model_dir, capsys):
    before = len(cluster.get("/api/jobs/"))
    done, seconds = prefopt(cluster, "submit", str(TINY_DPO), "--wait", "--no-working-dir",
                            *tiny_run(tmp_path, tiny_model_dir, "policy.cpus_per_worker=3"))
    with capsys.disabled():
        print(f"\n  policy.cpus_per_worker=3 on 2-CPU nodes: exit {done.returncode} after {seconds:.1f} s "
              "(the whole CLI process, imports included)")
    assert done.returncode == 3, done.stdout + done.stderr
    assert one_error(done.stderr) == (f"error: the cluster at {cluster.url}: policy: policy.cpus_per_worker=3 but "
                                      "the largest node has 2 CPU; lower policy.cpus_per_worker")
    assert len(cluster.get("/api/jobs/")) == before  # nothing was submitted


def test_wait_reports_the_jobs_own_error_in_one_line(cluster, tmp_path, tiny_model_dir, capsys):
    # A path that exists here and not "on the cluster": the driver's preflight refuses it.
    done, seconds = prefopt(cluster, "submit", str(TINY_DPO), "--wait", "--no-working-dir",
                            *tiny_run(tmp_path, tiny_model_dir, f"model.path={tmp_path / 'no-model'}"))
    with capsys.disabled():
        print(f"\n  a job that fails in its preflight: exit {done.returncode} after {seconds:.1f} s")
    assert done.returncode == 3, done.stdout + done.stderr
    line = one_error(done.stderr)
    assert re.fullmatch(rf"error: job prefopt-dpo-\S+ FAILED \(its command exited with 2\): model.path: "
                        rf"{re.escape(str(tmp_path / 'no-model'))} is not a Hugging Face model directory "
                        r"\(no config.json\)", line), line


def test_job_stop_stops_a_running_job(cluster, tmp_path, tiny_model_dir, capsys):
    done, _ = prefopt(cluster, "submit", str(TINY_DPO), "--working-dir", str(ROOT),
                      *tiny_run(tmp_path, tiny_model_dir, "train.max_steps=100000"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"uploaded \S+ \(\d+\.\d MiB zipped", done.stdout), done.stdout
    job_id = job_id_of(done.stdout)
    deadline = time.monotonic() + 300
    while (status := cluster.get(f"/api/jobs/{job_id}")["status"]) != "RUNNING":
        assert status == "PENDING" and time.monotonic() < deadline, status
        time.sleep(0.5)
    status_line, _ = prefopt(cluster, "job", "status", job_id)
    assert status_line.stdout.startswith(f"{job_id}  RUNNING"), status_line.stdout
    stopped, seconds = prefopt(cluster, "job", "stop", job_id)
    with capsys.disabled():
        print(f"\n  job stop: exit {stopped.returncode} after {seconds:.1f} s")
    assert stopped.returncode == 0 and f"job {job_id} STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr
    assert cluster.get(f"/api/jobs/{job_id}")["status"] == "STOPPED"
    listed, _ = prefopt(cluster, "job", "list")
    assert re.search(rf"{job_id}\s+STOPPED\s+{re.escape(str(TINY_DPO))}", listed.stdout), listed.stdout
    again, _ = prefopt(cluster, "job", "logs", job_id, "--follow")  # the outcome of a stopped job: 3
    assert again.returncode == 3 and one_error(again.stderr) == f"error: job {job_id} was stopped"


def test_a_missing_or_wrong_token_gets_one_line_saying_what_to_set(cluster, tmp_path):
    base = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    missing, _ = prefopt(cluster, "job", "list", env={**base, "HOME": str(tmp_path)})  # no ~/.ray/auth_token
    assert missing.returncode == 2
    assert one_error(missing.stderr).startswith(f"error: the Ray cluster at {cluster.url} wants an auth token "
                                                "and none was found here: set RAY_AUTH_TOKEN")
    wrong, _ = prefopt(cluster, "job", "list", env={**base, "RAY_AUTH_TOKEN": "not-the-token"})
    assert wrong.returncode == 2
    assert one_error(wrong.stderr).startswith(f"error: the Ray cluster at {cluster.url} rejected the auth "
                                              "token from RAY_AUTH_TOKEN")
    unknown, _ = prefopt(cluster, "job", "status", "prefopt-nope")
    assert unknown.returncode == 2 and "no job 'prefopt-nope' on the cluster" in one_error(unknown.stderr)

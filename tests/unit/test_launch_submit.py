"""`prefopt submit` and `prefopt job` without a cluster: addresses, auth answers, what a job is
submitted with (config, code package, environment), the resource check, outcomes, and fast
one-line failures. tests/integration/test_submit.py runs them against a real two-node Ray (this
file is named apart from it: pytest imports test files by basename)."""

from __future__ import annotations

import base64
import http.server
import json
import os
import socket
import subprocess
import threading
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from prefopt.cli import app
from prefopt.cluster.worker_group import ClusterError
from prefopt.config import RunConfig, load_config
from prefopt.launch.submit import (
    CONFIG_ENV,
    EXCLUDES,
    LaunchError,
    build_package,
    check_resources,
    describe_outcome,
    encode_config,
    entrypoint,
    is_prefopt_checkout,
    job_env,
    last_error_line,
    parse_env,
    plan,
    probe,
    resolve_address,
    roles_of,
    shipped_config,
    upload_limit,
)

ROOT = Path(__file__).resolve().parents[2]
TINY_DPO = ROOT / "configs/tiny/dpo.yaml"


def cfg(**tree) -> RunConfig:
    return RunConfig.model_validate(tree)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- addresses


def test_address_comes_from_the_option_then_rays_variables():
    env = {"RAY_ADDRESS": "http://b:8265", "RAY_API_SERVER_ADDRESS": "http://a:8265/"}
    assert resolve_address("http://given:8265", env) == ("http://given:8265", "--address")
    assert resolve_address(None, env) == ("http://a:8265", "RAY_API_SERVER_ADDRESS")  # Ray's order
    assert resolve_address(None, {"RAY_ADDRESS": "head:8265"}) == ("http://head:8265", "RAY_ADDRESS")
    assert resolve_address("https://h", {}) == ("https://h", "--address")
    with pytest.raises(LaunchError, match="no Ray cluster address: pass --address http://HEAD:8265"):
        resolve_address(None, {})
    for wrong in ("auto", "ray://head:10001", "grpc://h:1"):
        with pytest.raises(LaunchError, match="HTTP address of the head's dashboard"):
            resolve_address(wrong, {})


class _Answer(http.server.BaseHTTPRequestHandler):
    status, body = 200, b"{}"

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(self.status)
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def answering():
    """A local HTTP server answering every GET with the status and body it is given."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def set_answer(status: int, body: bytes = b"") -> str:
        _Answer.status, _Answer.body = status, body
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield set_answer
    server.shutdown()
    server.server_close()


def test_probe_says_what_to_do_for_each_answer(answering, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert probe(answering(200, json.dumps({"ray_version": "2.60.0"}).encode()), {}) == "2.60.0"
    with pytest.raises(LaunchError, match="wants an auth token and none was found here: set RAY_AUTH_TOKEN"):
        probe(answering(401, b"Unauthorized: Missing authentication token"), {})
    monkeypatch.setenv("RAY_AUTH_TOKEN", "wrong")
    with pytest.raises(LaunchError, match="rejected the auth token from RAY_AUTH_TOKEN: set RAY_AUTH_TOKEN"):
        probe(answering(403, b"Forbidden"), {})
    with pytest.raises(LaunchError, match=r"answers \(HTTP 404\) but is not a Ray dashboard"):
        probe(answering(404, b"nope"), {})
    with pytest.raises(LaunchError, match=r"answers \(HTTP 200\) but is not a Ray dashboard"):
        probe(answering(200, b"<html>"), {})


def test_the_token_is_sent_from_rays_usual_places_whatever_the_local_auth_mode(tmp_path, monkeypatch):
    from prefopt.launch.submit import auth_headers, token_source

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # not "token" here: sent all the same
    monkeypatch.setenv("RAY_AUTH_TOKEN", "abc123")
    assert auth_headers() == {"authorization": "Bearer abc123"}
    assert token_source() == "RAY_AUTH_TOKEN"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    (tmp_path / "tok").write_text("fromfile")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert auth_headers() == {"authorization": "Bearer fromfile"}
    assert token_source() == f"RAY_AUTH_TOKEN_PATH={tmp_path / 'tok'}"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(LaunchError, match="^Ray auth token: .*fix RAY_AUTH_TOKEN_PATH or set RAY_AUTH_TOKEN$"):
        auth_headers()
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token: nothing sent
    assert auth_headers() == {}


def one_error(output: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in output, output
    return errors[0]


def test_an_address_that_does_not_answer_fails_in_one_line_with_exit_4(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    port = closed_port()
    for args in (["job", "list"], ["job", "status", "x"], ["submit", str(TINY_DPO), "--no-working-dir"]):
        result = CliRunner().invoke(app, [*args, "--address", f"http://127.0.0.1:{port}"])
        assert result.exit_code == 4, result.output
        assert one_error(result.output).startswith(f"error: no Ray dashboard answers at http://127.0.0.1:{port} "
                                                   "(Connection refused); start the cluster")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    result = CliRunner().invoke(app, ["job", "list"])
    assert result.exit_code == 4 and "(from RAY_ADDRESS)" in one_error(result.output)


def test_a_bad_config_fails_before_anything_is_contacted():
    # The address does not answer: exit 2 (the config), not 4, shows nothing was contacted.
    result = CliRunner().invoke(app, ["submit", str(TINY_DPO), "--set", "train.lr=abc",
                                      "--address", f"http://127.0.0.1:{closed_port()}"])
    assert result.exit_code == 2, result.output
    assert "train.lr: Input should be a valid number" in one_error(result.output)
    result = CliRunner().invoke(app, ["submit", str(TINY_DPO), "--env", "NOVALUE",
                                      "--address", f"http://127.0.0.1:{closed_port()}"])
    assert result.exit_code == 2 and "--env NOVALUE: expected NAME=VALUE" in one_error(result.output)


# ----------------------------------------------------------------------------- what a job gets


def test_the_shipped_config_is_the_resolved_one_and_joins_the_cluster_it_runs_on(tmp_path):
    resolved = load_config(TINY_DPO, ["policy.num_workers=2", "train.lr=1e-3"])
    shipped = shipped_config(resolved)
    assert shipped.cluster.address == "auto" and resolved.cluster.address is None
    (tmp_path / "shipped.yaml").write_text(shipped.to_yaml())
    again = load_config(tmp_path / "shipped.yaml")
    assert again == shipped  # the YAML loads back to the same config
    named = load_config(TINY_DPO, ["cluster.address=10.0.0.1:6379"])
    assert shipped_config(named).cluster.address == "10.0.0.1:6379"


def test_the_entrypoint_writes_the_shipped_config_and_runs_train_on_it(tmp_path, monkeypatch):
    from ray._private.utils import update_envs

    # A stand-in `python` on the PATH records what the job's shell command runs.
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "$@" > "$RECORD"; cp "$4" "$RECORD.yaml"\n')
    fake.chmod(0o755)
    # `$` in a config value: Ray expands $NAME in every env_vars value on the node (update_envs).
    shipped = load_config(TINY_DPO, ["tracking.run_name=cost-$HOME-${NOPE}"])
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "RECORD": str(tmp_path / "ran"), "TMPDIR": str(tmp_path)}
    monkeypatch.setenv(CONFIG_ENV, "")
    update_envs({CONFIG_ENV: encode_config(shipped)})  # what the node does to the job's variables
    subprocess.run(["/bin/sh", "-c", entrypoint("my config.yaml")], env={**env, CONFIG_ENV: os.environ[CONFIG_ENV]},
                   check=True, timeout=30)
    args = (tmp_path / "ran").read_text().split()
    assert args[:3] == ["-m", "prefopt.launch.job_entry", "train"] and args[3].endswith("/my-config.yaml")
    assert load_config(tmp_path / "ran.yaml") == shipped
    assert load_config(tmp_path / "ran.yaml").tracking.run_name == "cost-$HOME-${NOPE}"


def test_job_environment_follows_mlflows_convention_and_passes_credentials():
    environ = {"MLFLOW_TRACKING_URI": "http://env:5000", "MLFLOW_TRACKING_TOKEN": "t", "AWS_ACCESS_KEY_ID": "k",
               "AWS_SECRET_ACCESS_KEY": "s", "AWS_SHARED_CREDENTIALS_FILE": "/home/me/.aws/credentials",
               "MLFLOW_TRACKING_USERNAME": "", "HOME": "/home/me", "RAY_AUTH_TOKEN": "secret"}
    env = job_env(cfg(), environ, {})
    assert env["MLFLOW_TRACKING_URI"] == "http://env:5000"
    assert env["MLFLOW_TRACKING_TOKEN"] == "t" and env["AWS_ACCESS_KEY_ID"] == "k"
    assert env["AWS_SECRET_ACCESS_KEY"] == "s"
    for left_out in ("AWS_SHARED_CREDENTIALS_FILE", "MLFLOW_TRACKING_USERNAME", "HOME", "RAY_AUTH_TOKEN"):
        assert left_out not in env
    assert env["DS_ACCELERATOR"] == "cpu" and env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"
    # tracking.uri wins over the environment; --env wins over everything.
    given = cfg(tracking={"uri": "http://config:5000"}, policy={"gpus_per_worker": 1})
    env = job_env(given, environ, {"MLFLOW_TRACKING_TOKEN": "other", "X": "1"})
    assert env["MLFLOW_TRACKING_URI"] == "http://config:5000" and "DS_ACCELERATOR" not in env
    assert env["MLFLOW_TRACKING_TOKEN"] == "other" and env["X"] == "1"
    assert "MLFLOW_TRACKING_URI" not in job_env(cfg(), {}, {})  # neither: the job's local default
    assert parse_env(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}


def test_plan_runtime_env_and_the_options_ray_would_refuse(tmp_path):
    run = load_config(TINY_DPO, [f"output_dir={tmp_path}/out", "tracking.uri=http://mlflow:5000"])
    package = tmp_path / "code.zip"
    sub = plan(run, TINY_DPO, package=package, pip=["numpy==2.0"], environ={})
    assert sub.runtime_env["working_dir"] == str(package) and sub.runtime_env["pip"] == ["numpy==2.0"]
    shipped = base64.b64decode(sub.runtime_env["env_vars"][CONFIG_ENV]).decode()
    assert RunConfig.model_validate(yaml.safe_load(shipped)) == shipped_config(run)
    assert sub.submission_id.startswith("prefopt-dpo-") and sub.metadata["prefopt.config"] == str(TINY_DPO)
    assert sub.entrypoint.endswith('exec python -m prefopt.launch.job_entry train "$dir"/dpo.yaml')
    assert sub.notes == []  # an absolute output_dir and a tracking server: nothing to warn about
    image = plan(run, TINY_DPO, package=None, image="registry/prefopt:1", environ={})
    assert image.runtime_env.keys() == {"env_vars", "image_uri"}
    for kwargs in ({"package": package}, {"package": None, "pip": ["x"]}):
        with pytest.raises(LaunchError, match="--image cannot go with .*Ray's image_uri takes only"):
            plan(run, TINY_DPO, image="registry/prefopt:1", environ={}, **kwargs)
    notes = plan(load_config(TINY_DPO), TINY_DPO, package=None, environ={}).notes
    assert any(n.startswith("output_dir=runs/tiny-dpo is relative") for n in notes)
    assert any(n.startswith("no tracking.uri and no MLFLOW_TRACKING_URI here") for n in notes)


def test_the_code_package_leaves_out_run_state_and_refuses_what_ray_would(tmp_path):
    src = tmp_path / "checkout"
    for name in ("prefopt/__init__.py", "prefopt/x.py", "configs/a.yaml", "data/pairs.jsonl", "notes.md",
                 ".git/HEAD", ".venv/bin/python", "runs/demo/mlflow.db", "runs/x/model.safetensors",
                 "mlruns/0/meta.yaml", "store.db", "prefopt/__pycache__/x.pyc", "scratch/big.bin",
                 "prefopt.egg-info/PKG-INFO"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text("x")
    (src / "pyproject.toml").write_text('[project]\nname = "prefopt"\nversion = "0"\n[tool.x]\nname = "other"\n')
    (src / ".gitignore").write_text("scratch/\n")
    assert is_prefopt_checkout(src) and not is_prefopt_checkout(tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "pyproject.toml").write_text('[project]\nname = "prefopt-fork"\n')
    assert not is_prefopt_checkout(tmp_path / "other")

    out = tmp_path / "out"
    out.mkdir()
    with zipfile.ZipFile(build_package(src, out, excludes=("notes.md",))) as zf:
        names = set(zf.namelist())
    files = {n for n in names if not n.endswith("/")}
    assert files == {"prefopt/__init__.py", "prefopt/x.py", "configs/a.yaml", "data/pairs.jsonl",
                     "pyproject.toml", ".gitignore"}, files

    (src / "data" / "big.jsonl").write_bytes(os.urandom(300_000))  # incompressible
    with pytest.raises(LaunchError) as err:
        build_package(src, out, limit=200_000)
    message = str(err.value)
    assert "\n" not in message and "over Ray's upload limit of 0.2 MiB" in message
    assert "largest: data/big.jsonl (0.3 MiB)" in message and "--no-working-dir" in message
    assert upload_limit() == 100 * 2**20  # Ray 2.60: the dashboard's request limit
    assert {".git", ".venv", "runs/", "mlruns/", "*.db"} <= set(EXCLUDES)


# ----------------------------------------------------------------------------- resources, outcomes


def test_roles_a_run_starts_and_the_resource_check():
    def names(**tree):
        return [name for name, _, _ in roles_of(cfg(**tree))]

    assert names() == ["policy", "reference"]  # DPO on the built-in task: reference cache and eval
    assert names(algorithm={"name": "simpo"}, data={"task": None, "path": "p.jsonl"}) == ["policy"]
    assert names(algorithm={"name": "reward_model"}) == ["policy"]
    assert names(algorithm={"name": "ppo"}) == ["policy", "reference", "critic"]

    nodes = [{"CPU": 2.0}, {"CPU": 2.0}]
    check_resources(cfg(policy={"num_workers": 2}), nodes, "http://h:8265")
    with pytest.raises(ClusterError) as err:
        check_resources(cfg(policy={"cpus_per_worker": 3}), nodes, "http://h:8265")
    assert str(err.value) == ("the cluster at http://h:8265: policy: policy.cpus_per_worker=3 but the largest node "
                              "has 2 CPU; lower policy.cpus_per_worker")
    assert err.value.exit_code == 3
    with pytest.raises(ClusterError, match="reference: ref.gpus_per_worker=1 but no node of the cluster has a GPU"):
        check_resources(cfg(ref={"gpus_per_worker": 1}), nodes, "http://h:8265")


def test_roles_that_each_fit_but_not_together_are_refused_at_once():
    nodes = [{"CPU": 2.0}, {"CPU": 2.0}]
    # DPO on the built-in task: the reference stays up beside the policy for the evaluation.
    with pytest.raises(ClusterError) as err:
        check_resources(cfg(policy={"num_workers": 3}, ref={"num_workers": 2}), nodes, "http://h:8265")
    assert str(err.value) == ("the cluster at http://h:8265: policy, reference run at the same time and together "
                              "need 3 x 1 (policy) + 2 x 1 (ref) = 5 CPU, the cluster has 4; lower num_workers or "
                              "cpus_per_worker of one of them, or add nodes")
    # A reference that only fills the cache is gone before the policy starts: no evaluation, no clash.
    check_resources(cfg(policy={"num_workers": 3}, ref={"num_workers": 2, "mode": "cache"},
                        data={"task": None, "path": "p.jsonl"}), nodes, "http://h:8265")
    # PPO keeps every role up; GPUs count the same way.
    with pytest.raises(ClusterError, match=r"policy, reference, critic run at the same time .* = 5 CPU"):
        check_resources(cfg(algorithm={"name": "ppo"}, policy={"num_workers": 2}, critic={"num_workers": 2}),
                        nodes, "http://h:8265")
    gpus = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]
    with pytest.raises(ClusterError, match=r"2 x 1 \(policy\) \+ 1 x 1 \(ref\) = 3 GPU, the cluster has 2"):
        check_resources(cfg(policy={"num_workers": 2, "gpus_per_worker": 1}, ref={"gpus_per_worker": 1}), gpus,
                        "http://h:8265")


def test_outcomes_and_the_drivers_error_line():
    logs = "loading\nerror: something else\n(worker) error: not at the start\nerror: model.path: /x is not a " \
           "Hugging Face model directory (no config.json)\n"
    assert last_error_line(logs) == "model.path: /x is not a Hugging Face model directory (no config.json)"
    assert last_error_line("fine\n") is None

    def info(status, message="", code=None):
        return SimpleNamespace(submission_id="prefopt-dpo-1", job_id="02000000", status=status, message=message,
                               driver_exit_code=code)

    assert describe_outcome(info("SUCCEEDED"), "") == (0, "job prefopt-dpo-1 SUCCEEDED")
    assert describe_outcome(info("STOPPED"), "").code == 3
    failed = describe_outcome(info("FAILED", "Job entrypoint command failed with exit code 2", 2), logs)
    assert failed.code == 3 and failed.line == ("job prefopt-dpo-1 FAILED (its command exited with 2): model.path: "
                                                "/x is not a Hugging Face model directory (no config.json)")
    setup = describe_outcome(info("FAILED", "runtime_env setup failed: pip install x. More below"), "")
    assert setup.line == "job prefopt-dpo-1 FAILED: runtime_env setup failed: pip install x"

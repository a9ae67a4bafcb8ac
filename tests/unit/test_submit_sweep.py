"""`prefopt submit` of a sweep without a cluster: the job's entrypoint and the files it carries,
the resource check of the largest trial, and the one line a job's entrypoint prints when the
nodes' Python cannot import prefopt's dependencies (prefopt.launch.job_entry)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from prefopt.cli import app
from prefopt.cluster.worker_group import ClusterError
from prefopt.launch.job_entry import FILES_ENV, unpack
from prefopt.launch.submit import (
    LaunchError,
    check_sweep_resources,
    largest_trial,
    plan_sweep,
    sweep_args,
    trial_need,
)
from prefopt.sweep.spec import load_sweep

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs/tiny"
FIX = ("install prefopt's dependencies on the nodes, pass --pip to prefopt submit, or run the nodes from the "
       "image in docker/")


@pytest.fixture
def sweep_file(tmp_path, monkeypatch):
    """configs/sweeps/cmp.yaml beside configs/tiny/{dpo,ppo}.yaml copies, in a fresh working dir."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "configs/tiny").mkdir(parents=True)
    for name in ("dpo.yaml", "ppo.yaml"):
        shutil.copy(TINY / name, tmp_path / "configs/tiny" / name)
    path = tmp_path / "configs/sweeps/cmp.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({
        "seeds": 2, "set": {"train.max_steps": 4},
        "methods": {"dpo": {"config": "../tiny/dpo.yaml", "grid": {"algorithm.beta": [0.1, 1]}},
                    "ppo": {"config": "../tiny/ppo.yaml", "set": {"critic.num_workers": 2}},
                    "dpo_again": {"config": "../tiny/dpo.yaml", "set": {"policy.num_workers": 2}}}}))
    return path


def ran(entrypoint: str, variables: dict[str, str], tmp_path: Path, monkeypatch) -> list[str]:
    """Run a job's shell command with a stand-in `python` on the PATH; the arguments it got."""
    from ray._private.utils import update_envs

    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text('#!/bin/sh\necho "$@" > "$RECORD"\n')
    fake.chmod(0o755)
    for key in variables:
        monkeypatch.setenv(key, "")
    update_envs(dict(variables))  # what the node does to the job's variables ($NAME expansion)
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "RECORD": str(tmp_path / "ran"), "TMPDIR": str(tmp_path),
           **{key: os.environ[key] for key in variables}}
    subprocess.run(["/bin/sh", "-c", entrypoint], env=env, check=True, timeout=30)
    return (tmp_path / "ran").read_text().split()


def test_a_sweep_file_travels_with_its_method_configs_and_runs_prefopt_sweep(sweep_file, tmp_path, monkeypatch):
    args = sweep_args(["train.lr=1e-4,5e-4"], None, ["eval.every_steps=2"], 3)
    here = load_sweep(sweep_file, grids=["train.lr=1e-4,5e-4"], sets=["eval.every_steps=2"], max_concurrent=3)
    sub = plan_sweep(here, sweep_file, args, package=None, environ={})
    assert sub.submission_id.startswith("prefopt-sweep-cmp-") and sub.metadata["prefopt.sweep"] == "cmp"
    assert sub.runtime_env["env_vars"]["DS_ACCELERATOR"] == "cpu"  # no trial asks for a GPU

    # The job's command: job_entry unpacks the files into a fresh folder, then `prefopt sweep` there.
    got = ran(sub.entrypoint, sub.runtime_env["env_vars"], tmp_path, monkeypatch)
    assert got[:4] == ["-m", "prefopt.launch.job_entry", "--unpack", got[3]]
    assert got[4:] == ["sweep", f"{got[3]}/cmp.yaml", "--grid", "train.lr=1e-4,5e-4", "--max-concurrent", "3",
                       "--set", "eval.every_steps=2"]
    files = json.loads(base64.b64decode(sub.runtime_env["env_vars"][FILES_ENV]))
    assert sorted(files) == ["cmp.yaml", "methods/dpo.yaml", "methods/ppo.yaml"]  # dpo.yaml once, for two methods

    # Unpacked elsewhere (no copy of configs/ beside it), the sweep reads as the same trials.
    job_dir = tmp_path / "job"
    unpack(str(job_dir), {FILES_ENV: sub.runtime_env["env_vars"][FILES_ENV]})
    there = load_sweep(job_dir / "cmp.yaml", grids=["train.lr=1e-4,5e-4"], sets=["eval.every_steps=2"],
                       max_concurrent=3)
    assert [t.id for t in there.trials] == [t.id for t in here.trials] and len(here.trials) == 2 * 2 * 2 + 2 * 2 + 2 * 2
    assert there.name == "cmp" and there.max_concurrent == 3 and there.output_dir == "runs/sweeps/cmp"
    for a, b in zip(here.trials, there.trials, strict=True):
        assert a.config is not None and b.config is not None, (a.error, b.error)
        assert a.config.cluster.address is None and b.config.cluster.address == "auto"  # joins its cluster
        assert b.config == a.config.model_copy(update={"cluster": b.config.cluster})
    assert {t.config.critic.num_workers for t in there.trials if t.method == "ppo"} == {2}
    assert {t.config.policy.num_workers for t in there.trials if t.method == "dpo_again"} == {2}


def test_a_run_config_with_grid_travels_alone_and_the_notes_name_the_sweeps_files(sweep_file, tmp_path,
                                                                                   monkeypatch):
    config = tmp_path / "configs/tiny/dpo.yaml"
    here = load_sweep(config, grids=["algorithm.beta=0.1,1"], seeds=2)
    sub = plan_sweep(here, config, sweep_args(["algorithm.beta=0.1,1"], 2), package=None, environ={})
    got = ran(sub.entrypoint, sub.runtime_env["env_vars"], tmp_path, monkeypatch)
    assert got[4:] == ["sweep", f"{got[3]}/dpo.yaml", "--grid", "algorithm.beta=0.1,1", "--seeds", "2"]
    files = json.loads(base64.b64decode(sub.runtime_env["env_vars"][FILES_ENV]))
    shipped = yaml.safe_load(files["dpo.yaml"])
    assert shipped["cluster"] == {"address": "auto"} and shipped["algorithm"] == {"name": "dpo", "beta": 0.1}
    # The trials' tracking store was resolved to a file here: not passed on; the job resolves its own.
    assert "MLFLOW_TRACKING_URI" not in sub.runtime_env["env_vars"]
    assert sub.notes[0].startswith("output_dir=runs/sweeps/dpo is relative")
    assert sub.notes[1].startswith("the sweep's tracking store=sqlite:")
    served = plan_sweep(here, config, [], package=None, environ={"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    assert served.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_the_largest_trial_is_checked_and_named_when_it_cannot_fit(sweep_file, tmp_path):
    nodes = [{"CPU": 2.0}, {"CPU": 2.0}]
    config = tmp_path / "configs/tiny/dpo.yaml"
    # DPO on the built-in task keeps its reference up for the evaluation: policy + 1 CPU.
    sweep = load_sweep(config, grids=["policy.num_workers=1,4,2"])
    assert [trial_need(t.config) for t in sweep.trials] == [(0.0, 2.0), (0.0, 5.0), (0.0, 3.0)]
    assert largest_trial(sweep).id == "dpo-num_workers=4-s0"
    with pytest.raises(ClusterError) as err:
        check_sweep_resources(sweep, nodes, "http://h:8265")
    assert str(err.value) == (
        "sweep dpo: its largest trial, dpo-num_workers=4-s0 (0 GPU, 5 CPU at once), cannot run: the cluster at "
        "http://h:8265: policy, reference run at the same time and together need 4 x 1 (policy) + 1 x 1 (ref) = "
        "5 CPU, the cluster has 4; lower num_workers or cpus_per_worker of one of them, or add nodes")
    assert err.value.exit_code == 3
    check_sweep_resources(load_sweep(config, grids=["policy.num_workers=1,3"]), nodes, "http://h:8265")

    # A reference that only fills the cache is never up beside the policy, but a trial's placement
    # group holds its own bundle (of another shape) all the same: 3 x 1 + 1 x 2 CPU.
    apart = load_sweep(config, seeds=1, sets=["data.task=null", "data.path=p.jsonl", "ref.mode=cache",
                                             "ref.cpus_per_worker=2", "policy.num_workers=3"])
    with pytest.raises(ClusterError) as err:
        check_sweep_resources(apart, nodes, "http://h:8265")
    assert str(err.value) == ("sweep dpo: its largest trial, dpo-s0 (0 GPU, 5 CPU at once), cannot run: the cluster "
                              "at http://h:8265 has 4 CPU; lower its roles' num_workers or cpus_per_worker/"
                              "gpus_per_worker, or add nodes")


def test_a_sweep_without_a_valid_trial_is_refused_before_anything_is_contacted(sweep_file, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed: exit 2, not 4, shows nothing was contacted
    result = CliRunner().invoke(app, ["submit", str(tmp_path / "configs/tiny/dpo.yaml"), "--grid",
                                      "train.lr=abc,xyz", "--address", f"http://127.0.0.1:{port}"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert errors[0].startswith(f"error: {tmp_path}/configs/tiny/dpo.yaml: none of the sweep's 2 trial(s) has a "
                                "valid config; the first, dpo-lr=abc-s0: ")
    assert "train.lr: Input should be a valid number" in errors[0]
    with pytest.raises(LaunchError):
        largest_trial(load_sweep(tmp_path / "configs/tiny/dpo.yaml", grids=["train.lr=abc"]))
    # A sweep that is valid goes on to contact the cluster (which does not answer: exit 4).
    result = CliRunner().invoke(app, ["submit", str(sweep_file), "--no-working-dir", "--address",
                                      f"http://127.0.0.1:{port}"])
    assert result.exit_code == 4, result.output


# ----------------------------------------------------------------------------- the job's entrypoint


def job_entry(code: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m prefopt.launch.job_entry ARGS` after running `code` in the same interpreter."""
    run = f"{code}\nimport runpy, sys\nsys.argv = ['job_entry', *{list(args)!r}]\n" \
          "runpy.run_module('prefopt.launch.job_entry', run_name='__main__')"
    return subprocess.run([sys.executable, "-c", run], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_a_python_that_cannot_import_a_dependency_says_so_in_one_line(tmp_path):
    version = ".".join(map(str, sys.version_info[:3]))
    # typer unimportable, everything else there: the line names this interpreter and typer.
    done = job_entry("import sys; sys.modules['typer'] = None", "train", "configs/tiny/dpo.yaml")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"error: prefopt job: {sys.executable} (Python {version}) cannot import "
                                        f"typer: {FIX}"]
    # A bare interpreter (-S: no site-packages at all) stops at the first dependency.
    bare = subprocess.run([sys.executable, "-S", "-m", "prefopt.launch.job_entry", "train", "x.yaml"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert bare.returncode == 2
    assert bare.stderr.splitlines() == [f"error: prefopt job: {sys.executable} (Python {version}) cannot import "
                                        f"yaml: {FIX}"]
    # An import that fails for another reason than a missing module (a library built for another
    # CUDA, say) says why.
    (tmp_path / "rich.py").write_text("raise OSError('libfoo.so: cannot open shared object file')\n")
    broken = job_entry(f"import sys; sys.path.insert(0, {str(tmp_path)!r})", "train", "x.yaml")
    assert broken.returncode == 2
    assert broken.stderr.splitlines() == [f"error: prefopt job: {sys.executable} (Python {version}) cannot import "
                                          f"rich (OSError: libfoo.so: cannot open shared object file): {FIX}"]


def test_with_its_dependencies_it_runs_the_prefopt_command_and_its_exit_code(tmp_path):
    done = job_entry("", "train", str(tmp_path / "missing.yaml"))
    assert done.returncode == 2
    assert f"error: {tmp_path}/missing.yaml: no such config file" in done.stderr.replace("\n", "")
    assert "prefopt job:" not in done.stderr


def test_the_prepare_stages_configs_travel_with_the_sweep(tmp_path):
    from prefopt.launch.submit import sweep_files

    recipe = Path(__file__).resolve().parents[2] / "configs" / "sweeps" / "dpo-paper-sentiment.yaml"
    name, files = sweep_files(recipe)
    job_dir = tmp_path / "job"
    for relative, text in files.items():
        (job_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        (job_dir / relative).write_text(text)
    here, there = load_sweep(recipe), load_sweep(job_dir / name)
    assert [(s.name, s.command) for s in there.prepare] == [(s.name, s.command) for s in here.prepare] == [
        ("sft", "train"), ("samples", "generate"), ("pairs", "label"), ("reward_model", "train")]
    for a, b in zip(here.prepare, there.prepare, strict=True):
        assert b.config == a.config.model_copy(update={"cluster": b.config.cluster})
    assert [t.id for t in there.trials] == [t.id for t in here.trials]

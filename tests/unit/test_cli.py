import errno
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from prefopt.cli import app

TINY = str(Path(__file__).resolve().parents[2] / "configs/tiny/dpo.yaml")


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "prefopt", *args], capture_output=True, text=True, timeout=120
    )


def test_config_show_prints_resolved_yaml():
    out = run_cli("config", "show", TINY, "--set", "train.lr=0.002")
    assert out.returncode == 0, out.stderr
    tree = yaml.safe_load(out.stdout)
    assert tree["train"]["lr"] == 0.002
    assert tree["algorithm"]["name"] == "dpo"


def test_config_show_bad_value_is_one_line_without_traceback():
    out = run_cli("config", "show", TINY, "--set", "train.lr=abc")
    assert out.returncode == 2  # README: 2, a bad config
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert "train.lr" in lines[0]
    assert "Traceback" not in out.stderr


def test_config_show_misspelled_key_names_it(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_step: 3\n")
    out = run_cli("config", "show", str(bad))
    assert out.returncode == 2
    assert "train.max_step" in out.stderr and "max_steps" in out.stderr
    assert "Traceback" not in out.stderr


# ---------------------------------------------------------------------------- exit codes
# The real `prefopt train` command in-process (typer's CliRunner): the config is read and
# checked, then the controller is replaced by one that fails the way a run can fail.


def train_failing_with(exc, monkeypatch, tmp_path):
    def controller(cfg, console, *, resume=None):
        raise exc

    monkeypatch.setattr("prefopt.algorithms.train", controller)
    return CliRunner().invoke(app, ["train", TINY, "--set", f"output_dir={tmp_path / 'run'}"])


def error_lines(result):
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def test_a_diverged_run_exits_5(monkeypatch, tmp_path):
    from prefopt.algorithms.stages import TrainingDiverged

    said = "training stopped by the health guard at step 7: loss nan; resume from the last good checkpoint"
    result = train_failing_with(TrainingDiverged(said), monkeypatch, tmp_path)
    assert result.exit_code == 5, result.output
    assert error_lines(result) == [f"error: {said}"]
    assert "Traceback" not in result.output


def test_a_bug_exits_70_with_its_traceback_saved(monkeypatch, tmp_path):
    result = train_failing_with(ZeroDivisionError("the bug's words"), monkeypatch, tmp_path)
    assert result.exit_code == 70, result.output
    log = tmp_path / "run" / "prefopt-error.log"
    (line,) = error_lines(result)
    assert line.startswith("error: internal error, a bug: ZeroDivisionError: the bug's words")
    assert str(log) in line
    assert "Traceback" in log.read_text() and "ZeroDivisionError: the bug's words" in log.read_text()
    assert "Traceback" not in result.output


def test_an_interrupted_run_exits_130(monkeypatch, tmp_path):
    result = train_failing_with(KeyboardInterrupt(), monkeypatch, tmp_path)
    assert result.exit_code == 130, result.output
    assert error_lines(result) == ["error: interrupted"]


@pytest.mark.parametrize("kind", [FileNotFoundError, PermissionError, IsADirectoryError])
def test_a_path_error_names_the_path_and_its_config_field(kind, monkeypatch, tmp_path):
    code = {FileNotFoundError: errno.ENOENT, PermissionError: errno.EACCES, IsADirectoryError: errno.EISDIR}[kind]
    missing = tmp_path / "run" / "data" / "manifest.json"
    result = train_failing_with(kind(code, "the system's words", str(missing)), monkeypatch, tmp_path)
    assert result.exit_code == 2, result.output
    assert error_lines(result) == [f"error: {missing} (output_dir): the system's words"]


def test_a_path_error_without_a_path_says_where_it_was_raised(monkeypatch, tmp_path):
    # `error: [Errno 2] No such file or directory` alone (seen in a job on a cluster) says nothing.
    result = train_failing_with(FileNotFoundError(errno.ENOENT, "No such file or directory"), monkeypatch, tmp_path)
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result)
    assert line.startswith("error: No such file or directory (errno 2), and the code that raised it named no path: "
                           f"raised at {__file__}:")
    log = tmp_path / "run" / "prefopt-error.log"
    assert f"the traceback is in {log}" in line and "FileNotFoundError" in log.read_text()


def test_a_real_path_error_names_the_path(tmp_path):
    # Not replaced: build-tiny asked to write under a file fails in mkdir, with Python's error.
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    result = CliRunner().invoke(app, ["model", "build-tiny", str(a_file / "model")])
    assert result.exit_code == 2, result.output
    assert error_lines(result) == [f"error: {a_file / 'model'}: Not a directory"]

import subprocess
import sys
from pathlib import Path

import yaml

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
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert "train.lr" in lines[0]
    assert "Traceback" not in out.stderr


def test_config_show_misspelled_key_names_it(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_step: 3\n")
    out = run_cli("config", "show", str(bad))
    assert out.returncode != 0
    assert "train.max_step" in out.stderr and "max_steps" in out.stderr
    assert "Traceback" not in out.stderr

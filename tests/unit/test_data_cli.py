"""`prefopt data validate CONFIG`: the report a user reads before renting GPUs."""

import json
import os
import subprocess
import sys


def run_validate(tmp_path, model_dir, *sets):
    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  path: {model_dir}\noutput_dir: {tmp_path / 'run'}\n")
    args = [sys.executable, "-m", "prefopt", "data", "validate", str(config)]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = {"prompt": "The film was", "chosen": " great.", "rejected": " awful."}


def test_validate_reports_bad_rows_and_exits_1(tmp_path, tiny_model_dir):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, {**GOOD, "rejected": " great."}, GOOD])
    out = run_validate(tmp_path, tiny_model_dir, f"data.path={path}")
    assert out.returncode == 1, out.stderr
    assert "2 kept of 3 read" in out.stdout
    assert "bad: identical" in out.stdout
    assert f"{path}: line 2 (1-based), field 'chosen': same completion as 'rejected'" in out.stdout
    assert "the run would stop" in out.stdout
    assert not (tmp_path / "run" / "data").exists()


def test_validate_with_skip_passes_and_says_what_it_would_drop(tmp_path, tiny_model_dir):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, {**GOOD, "prompt": ""}])
    out = run_validate(tmp_path, tiny_model_dir, f"data.path={path}", "data.on_bad_row=skip")
    assert out.returncode == 0, out.stderr
    assert "bad: empty" in out.stdout and "1 bad row(s) would be skipped" in out.stdout
    assert "fingerprint" in out.stdout


def test_validate_unusable_source_is_one_error_line(tmp_path, tiny_model_dir):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Hi", "chosen": " a", "rejected": " b", "score": 1}])
    out = run_validate(tmp_path, tiny_model_dir, f"data.path={path}")
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "extra column(s) score" in lines[0], out.stderr
    assert "Traceback" not in out.stderr

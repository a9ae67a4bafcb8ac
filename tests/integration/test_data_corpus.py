"""A corpus prepared in parallel processes is the same bytes as one prepared in one; a preparation
killed (SIGKILL) partway prepares only its missing parts when started again."""

import json
import subprocess
import sys
import textwrap

import pytest
from data_files import messy_jsonl

from prefopt.config import RunConfig
from prefopt.data import DataError, prepare
from prefopt.data.prepare import prepare_parts

KILL_AT = 40  # parts done when the first preparation kills itself


def cfg_for(path, **data):
    return RunConfig.model_validate({"data": {"path": str(path), "on_bad_row": "skip", **data}})


def test_killed_preparation_resumes_in_parallel_to_the_bytes_of_one_process(tmp_path, tiny_model_dir, tiny_tokenizer):
    path = messy_jsonl(tmp_path / "corpus.jsonl", n=600)
    settings = {"part_rows": 5}
    # The first run kills itself with SIGKILL once KILL_AT parts are done: nothing is cleaned up.
    script = textwrap.dedent(f"""
        import os, signal
        from transformers import AutoTokenizer
        from prefopt.config import RunConfig
        from prefopt.data import DataError, prepare

        def progress(done, total):
            if done == {KILL_AT}:
                os.kill(os.getpid(), signal.SIGKILL)

        if __name__ == "__main__":
            cfg = RunConfig.model_validate({{"data": {json.dumps({"path": str(path), "on_bad_row": "skip",
                                                                   "num_proc": 1, **settings})}}})
            prepare(cfg, AutoTokenizer.from_pretrained({str(tiny_model_dir)!r}), {str(tmp_path / "out")!r}, progress)
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr
    (parts_dir,) = (tmp_path / "out").glob("parts-*")
    assert len(list(parts_dir.glob("part-*.json"))) == KILL_AT
    assert not list((tmp_path / "out").glob("tokenized-*"))  # nothing written as the run's data

    resumed_cfg = cfg_for(path, num_proc=2, **settings)
    resumed = prepare_parts(resumed_cfg, tiny_tokenizer, tmp_path / "out")
    assert resumed.reused == KILL_AT and len(resumed.plan.parts) > 2 * KILL_AT
    td = prepare(resumed_cfg, tiny_tokenizer, tmp_path / "out")

    one = prepare(cfg_for(path, num_proc=1, **settings), tiny_tokenizer, tmp_path / "one")
    assert td.fingerprint == one.fingerprint
    assert (td.path / "examples.arrow").read_bytes() == (one.path / "examples.arrow").read_bytes()
    assert [str(p) for p in td.report.problems] == [str(p) for p in one.report.problems]
    assert td.report.problems and td.num_rows > 400


def test_parallel_preparation_reports_a_whole_source_problem_in_one_line(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"p {i}", "chosen": " yes", "rejected": " no"} for i in range(60)]
    rows[47]["extra"] = 1
    path = tmp_path / "late.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # raised in a worker process, it arrives as the DataError it is: one line, no traceback
    with pytest.raises(DataError, match=r"extra column\(s\) extra \(first in line 48\)"):
        prepare(cfg_for(path, part_rows=10, num_proc=2), tiny_tokenizer, tmp_path / "out")

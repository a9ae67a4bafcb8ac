"""A source prepared in parts gives what it gives read whole: the same rows, bytes, fingerprint,
and the same problems at the same lines; the fingerprint does not depend on how data is cut."""

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_files import messy_jsonl, pair_rows

from prefopt.config import RunConfig
from prefopt.data import DataError, prepare
from prefopt.data import parts as parts_module
from prefopt.data.fingerprint import fingerprint, fingerprint_tables
from prefopt.data.parts import _jsonl_parts
from prefopt.data.prepare import check, prepare_parts


def cfg_for(path, **data):
    return RunConfig.model_validate({"data": {"path": str(path), "on_bad_row": "skip", **data}})


def test_fingerprint_is_the_same_however_the_table_is_cut():
    rnd = random.Random(1)
    n = 57
    table = pa.table({
        "row": list(range(n)),
        "prompt_ids": pa.array([[rnd.randrange(900) for _ in range(rnd.randint(1, 9))] for _ in range(n)],
                               pa.list_(pa.int32())),
        "chosen_ids": pa.array([[rnd.randrange(900) for _ in range(rnd.randint(0, 5))] for _ in range(n)],
                               pa.list_(pa.int32())),
        "label": [rnd.random() < 0.5 for _ in range(n)],
        "prompt": [f"p\u00e9 {i} \"q\"" for i in range(n)],
    })
    kw = dict(format="unpaired", tokenizer_id="t", max_length=64, max_prompt_length=16)
    whole = fingerprint(table, **kw)
    for cuts in ([0, 57], [0, 0, 20, 20, 57], [0, 1, 2, 30, 56, 57], list(range(0, 58, 5)) + [57]):
        pieces = [table.slice(a, b - a) for a, b in zip(cuts, cuts[1:], strict=False)]
        assert fingerprint_tables(lambda pieces=pieces: pieces, **kw) == whole
    # and it still sees a change of one id in the last piece
    changed = table.set_column(1, "prompt_ids", pa.array(
        table["prompt_ids"].to_pylist()[:-1] + [[1, 2, 3]], pa.list_(pa.int32())))
    assert fingerprint_tables(lambda: [changed.slice(0, 30), changed.slice(30)], **kw) != whole


@pytest.mark.parametrize("scan_bytes", [16 << 20, 61, 64])  # small: lines (and \r\n) cut between scans
def test_jsonl_parts_count_lines_as_splitlines_does(tmp_path, monkeypatch, scan_bytes):
    monkeypatch.setattr(parts_module, "_SCAN_BYTES", scan_bytes)
    path = messy_jsonl(tmp_path / "m.jsonl")
    data = path.read_bytes()
    for part_rows in (1, 4, 7, 50, 10_000):
        parts = _jsonl_parts(path, part_rows)
        assert parts[0].start == 3 and parts[-1].stop == len(data)
        for part, after in zip(parts, parts[1:], strict=False):
            assert part.stop == after.start and data[part.stop - 1:part.stop] == b"\n"
            assert after.first_row == part.first_row + len(data[part.start:part.stop].splitlines())
        assert len(parts) == len(range(0, data.count(b"\n") + (not data.endswith(b"\n")), part_rows))


@pytest.mark.parametrize("part_rows", [1, 7, 33])
def test_jsonl_in_parts_equals_the_file_read_whole(tmp_path, tiny_tokenizer, part_rows):
    path = messy_jsonl(tmp_path / "m.jsonl")
    whole = prepare(cfg_for(path, part_rows=10_000), tiny_tokenizer, tmp_path / "whole")
    parts = prepare(cfg_for(path, part_rows=part_rows, num_proc=1), tiny_tokenizer, tmp_path / "parts")
    assert parts.fingerprint == whole.fingerprint and parts.num_rows == whole.num_rows > 80
    assert parts.table.to_pylist() == whole.table.to_pylist()
    assert [str(p) for p in parts.report.problems] == [str(p) for p in whole.report.problems]
    reasons = {p.reason for p in whole.report.problems}
    assert reasons >= {"bad_json", "identical", "empty", "not_utf8"}
    assert parts.report.rows_read == whole.report.rows_read
    # the line numbers are the file's: each problem's line holds what it says
    lines = (tmp_path / "m.jsonl").read_bytes()[3:].splitlines()
    for p in whole.report.problems:
        if p.reason == "bad_json":
            assert lines[p.row - 1] == b"{not json"


def test_parquet_in_parts_equals_the_file_read_whole(tmp_path, tiny_tokenizer):
    rows = pair_rows(95)
    rows[40]["rejected"] = rows[40]["chosen"]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet", row_group_size=13)
    whole = check(cfg_for(tmp_path / "p.parquet"), tiny_tokenizer)
    parts = prepare_parts(cfg_for(tmp_path / "p.parquet", part_rows=10, num_proc=1), tiny_tokenizer)
    assert len(parts.plan.parts) == 10
    assert pa.concat_tables(list(parts.tables())).to_pylist() == whole.table.to_pylist()
    assert [str(p) for p in parts.report.problems] == [str(p) for p in whole.report.problems]
    assert [p.row for p in parts.report.problems] == [41]


def test_a_column_first_seen_in_a_later_part_is_named_with_its_line(tmp_path, tiny_tokenizer):
    rows = pair_rows(30)
    rows[21]["score"] = 3
    path = tmp_path / "late.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"extra column\(s\) score \(first in line 22\).*data.ignore_columns"):
        prepare(cfg_for(path, part_rows=10, num_proc=1), tiny_tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing left behind for a file that must change
    td = prepare(cfg_for(path, part_rows=10, num_proc=1, ignore_columns=["score"]), tiny_tokenizer, tmp_path / "out")
    assert td.num_rows == 30


def test_a_damaged_part_is_prepared_again_and_the_rest_reused(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pair_rows(60)))
    cfg = cfg_for(path, part_rows=10, num_proc=1)
    first = prepare_parts(cfg, tiny_tokenizer, tmp_path / "out")
    assert first.reused == 0 and len(first.plan.parts) == 6
    damaged = first.parts_dir / "part-000002.arrow"
    damaged.write_bytes(damaged.read_bytes()[:-40])
    (first.parts_dir / "part-000004.json").unlink()
    again = prepare_parts(cfg, tiny_tokenizer, tmp_path / "out")
    assert again.reused == 4
    assert again.fingerprint(cfg, tiny_tokenizer) == first.fingerprint(cfg, tiny_tokenizer)


def test_a_finished_preparation_is_reused_without_reading_the_file(tmp_path, tiny_tokenizer):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pair_rows(40)))
    cfg = cfg_for(path, part_rows=10, num_proc=1)
    calls = []
    td = prepare(cfg, tiny_tokenizer, tmp_path / "out", progress=lambda done, total: calls.append(done))
    assert calls == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [td.path.name]  # the parts are gone
    calls.clear()
    again = prepare(cfg, tiny_tokenizer, tmp_path / "out", progress=lambda done, total: calls.append(done))
    assert calls == [] and again.path == td.path and again.report.rows_kept == 40
    # a changed file is prepared again
    path.write_text(path.read_text() + json.dumps(pair_rows(1, seed=5)[0]) + "\n")
    third = prepare(cfg, tiny_tokenizer, tmp_path / "out", progress=lambda done, total: calls.append(done))
    assert calls and third.num_rows == 41


def test_rows_are_numbered_in_memory_sources_cut_in_parts(tmp_path, tiny_tokenizer):
    # A CSV is read whole, then cut: its problems stay on their rows.
    rows = pair_rows(25)
    rows[17]["chosen"] = rows[17]["rejected"]
    pa_table = pa.Table.from_pylist(rows)
    import pyarrow.csv as pacsv

    pacsv.write_csv(pa_table, tmp_path / "c.csv")
    whole = check(cfg_for(tmp_path / "c.csv"), tiny_tokenizer)
    parts = prepare_parts(cfg_for(tmp_path / "c.csv", part_rows=4, num_proc=1), tiny_tokenizer)
    assert len(parts.plan.parts) == 7 and parts.plan.kind == "rows"
    assert [str(p) for p in parts.report.problems] == [str(p) for p in whole.report.problems]
    assert np.array_equal(pa.concat_tables(list(parts.tables()))["row"].to_numpy(), whole.table["row"].to_numpy())

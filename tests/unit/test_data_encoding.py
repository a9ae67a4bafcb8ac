"""Bytes that are not UTF-8 make a bad row with its number (or one DataError line), never a crash."""

import codecs
import json

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from prefopt.cli import app
from prefopt.config import RunConfig
from prefopt.data import DataError, check, prepare

GOOD = {"prompt": "The film was", "chosen": " great.", "rejected": " awful."}
# Line 3 holds 0xe9, an "é" saved as Windows-1252 / Latin-1.
LINE_3 = b'{"prompt": "The caf\xe9 film was", "chosen": " great.", "rejected": " awful."}'
NOT_UTF8_3 = ("line 3 (1-based): not UTF-8: byte 0xe9 at column 20, near "
              "'{\"prompt\": \"The caf\ufffd film was\", \"chosen'; save the data as UTF-8 (it may be in "
              "another encoding, such as Windows-1252), or fix that character")


def cfg_for(path, **data):
    return RunConfig.model_validate({"data": {"path": str(path), **data}})


def jsonl_with_bad_line_3(path):
    rows = [json.dumps(r).encode() for r in (GOOD, {**GOOD, "chosen": " fun."})]
    rows += [LINE_3, json.dumps({**GOOD, "chosen": " good."}).encode()]
    path.write_bytes(b"\n".join(rows) + b"\n")
    return path


def invalid_strings(values):
    # Arrow does not check UTF-8 when viewing bytes as strings: how a writer can store such data.
    return pa.array(values, type=pa.binary()).view(pa.string())


def test_jsonl_byte_is_a_bad_row_with_its_line_and_the_other_lines_are_read(tmp_path, tiny_tokenizer):
    path = jsonl_with_bad_line_3(tmp_path / "pairs.jsonl")
    checked = check(cfg_for(path), tiny_tokenizer)
    (problem,) = checked.report.problems
    assert (problem.reason, problem.row, problem.field) == ("not_utf8", 3, None)
    assert str(problem) == f"{path}: {NOT_UTF8_3}"
    assert checked.table["row"].to_pylist() == [1, 2, 4]
    assert (checked.report.rows_read, checked.report.dropped) == (4, {"not_utf8": 1})


def test_data_validate_exits_1_then_0_with_skip(tmp_path, tiny_model_dir):
    path = jsonl_with_bad_line_3(tmp_path / "pairs.jsonl")
    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  path: {tiny_model_dir}\noutput_dir: {tmp_path / 'run'}\n")
    args = ["data", "validate", str(config), "--set", f"data.path={path}"]

    out = CliRunner().invoke(app, args)
    assert out.exit_code == 1, out.output
    assert "3 kept of 4 read" in out.stdout and "bad: not_utf8" in out.stdout
    assert f"{path}: {NOT_UTF8_3}" in out.stdout
    assert "the run would stop" in out.stdout

    out = CliRunner().invoke(app, [*args, "--set", "data.on_bad_row=skip"])
    assert out.exit_code == 0, out.output
    assert "3 kept of 4 read" in out.stdout and "1 bad row(s) would be skipped" in out.stdout


def test_prepare_stops_on_the_line_or_skips_it(tmp_path, tiny_tokenizer):
    path = jsonl_with_bad_line_3(tmp_path / "pairs.jsonl")
    with pytest.raises(DataError) as err:
        prepare(cfg_for(path), tiny_tokenizer, tmp_path / "out")
    assert str(err.value).splitlines()[1] == f"{path}: {NOT_UTF8_3}"
    td = prepare(cfg_for(path, on_bad_row="skip"), tiny_tokenizer, tmp_path / "out")
    assert td.num_rows == 3 and td.report.dropped == {"not_utf8": 1}
    assert [r["row"] for r in td.rows([0, 1, 2])] == [1, 2, 4]


def test_csv_byte_is_a_bad_row_naming_its_column(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.csv"
    path.write_bytes(b"prompt,chosen,rejected\nHi, Hello., Bye.\nHi, Caf\xe9., Bye.\nHi, Yes., No.\n")
    checked = check(cfg_for(path), tiny_tokenizer)
    (problem,) = checked.report.problems
    assert str(problem) == (f"{path}: row 2 (1-based), field 'chosen': not UTF-8: byte 0xe9 at character 5, "
                            "near ' Caf\ufffd.'; save the data as UTF-8 (it may be in another encoding, such "
                            "as Windows-1252), or fix that character")
    assert checked.table["row"].to_pylist() == [1, 3]


def test_csv_header_byte_is_one_error_line(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.csv"
    path.write_bytes(b"prompt,ch\xe9sen,rejected\nHi, Hello., Bye.\n")
    with pytest.raises(DataError) as err:
        check(cfg_for(path), tiny_tokenizer)
    assert str(err.value).startswith(f"{path}: a column name in the header is not UTF-8: byte 0xe9 at character 3")
    assert "\n" not in str(err.value)


def test_parquet_and_saved_dataset_strings_that_are_not_utf8(tmp_path, tiny_tokenizer):
    import datasets
    import pyarrow.parquet as pq

    table = pa.table({"prompt": invalid_strings([b"Hi", b"Caf\xe9", b"Hi"]),
                      "chosen": [" Hello.", " Yes.", " Fine."], "rejected": [" Bye.", " No.", " Bad."]})
    pq.write_table(table, tmp_path / "d.parquet")
    datasets.Dataset(table).save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "d.parquet", tmp_path / "saved"):
        checked = check(cfg_for(path), tiny_tokenizer)
        (problem,) = checked.report.problems
        assert (problem.reason, problem.row, problem.field) == ("not_utf8", 2, "prompt")
        assert "byte 0xe9 at character 4, near 'Caf\ufffd'" in problem.message
        assert checked.table["row"].to_pylist() == [1, 3]


def test_load_dataset_directory(tmp_path, tiny_tokenizer):
    (tmp_path / "jsonl").mkdir()
    jsonl_with_bad_line_3(tmp_path / "jsonl" / "pairs.jsonl")
    (problem,) = check(cfg_for(tmp_path / "jsonl"), tiny_tokenizer).report.problems
    assert (problem.reason, problem.row, problem.field) == ("not_utf8", 3, "prompt")
    # datasets' CSV builder fails on the byte: the source is unusable, in one line, not a crash.
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "d.csv").write_bytes(b"prompt,chosen,rejected\nCaf\xe9, Hello., Bye.\n")
    with pytest.raises(DataError, match="datasets.load_dataset failed: .*can't decode byte 0xe9"):
        check(cfg_for(tmp_path / "csv"), tiny_tokenizer)


def test_json_array_byte_stops_naming_the_line(tmp_path, tiny_tokenizer):
    path = tmp_path / "pairs.json"
    path.write_bytes(b"[\n" + json.dumps(GOOD).encode() + b",\n" + LINE_3 + b"\n]\n")
    with pytest.raises(DataError) as err:
        check(cfg_for(path), tiny_tokenizer)
    assert str(err.value) == f"{path}: {NOT_UTF8_3}"


def test_byte_order_marks(tmp_path, tiny_tokenizer):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + json.dumps(GOOD).encode() + b"\n")
    assert check(cfg_for(path), tiny_tokenizer).report.problems == []
    for name in ("utf16.jsonl", "utf16.csv"):
        (tmp_path / name).write_text(json.dumps(GOOD) + "\n", encoding="utf-16")
        with pytest.raises(DataError, match="the file is UTF-16 .*; save it as UTF-8"):
            check(cfg_for(tmp_path / name), tiny_tokenizer)


def test_line_numbers_count_newlines_only(tmp_path, tiny_tokenizer):
    # U+2028 and U+0085 may stand unescaped in a JSON string; they do not end a line.
    path = tmp_path / "pairs.jsonl"
    first = json.dumps({**GOOD, "prompt": "The film\u2028was\x85good"}, ensure_ascii=False)
    path.write_text(f"{first}\r\n{json.dumps(GOOD)}\r\n{json.dumps({**GOOD, 'prompt': ''})}\n")
    (problem,) = check(cfg_for(path), tiny_tokenizer).report.problems
    assert (problem.row, problem.reason) == (3, "empty")


def test_num_examples_counts_lines_that_could_not_be_read(tmp_path, tiny_tokenizer):
    path = jsonl_with_bad_line_3(tmp_path / "pairs.jsonl")
    checked = check(cfg_for(path, num_examples=2), tiny_tokenizer)
    assert checked.report.problems == [] and checked.table["row"].to_pylist() == [1, 2]
    checked = check(cfg_for(path, num_examples=3, on_bad_row="skip"), tiny_tokenizer)
    assert [p.row for p in checked.report.problems] == [3] and checked.table["row"].to_pylist() == [1, 2]

"""The fingerprint changes when any input changes, and only then; data is written once per fingerprint."""

import copy
import json
import pickle
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from prefopt.config import RunConfig
from prefopt.data import TokenizedData, check, prepare
from prefopt.data.fingerprint import fingerprint, tokenizer_fingerprint
from prefopt.models import build_tokenizer
from prefopt.tasks.imdb import load_reviews

ROWS = [
    {"prompt": "The film was", "chosen": " a quiet, moving portrait of grief.", "rejected": " boring and far too long."},
    {"prompt": "I watched this movie", "chosen": " twice and loved it both times.", "rejected": " and regretted every minute."},
    {"prompt": "The acting", "chosen": " is superb throughout.", "rejected": " is wooden at best."},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def fp(path, tokenizer, **data):
    cfg = RunConfig.model_validate({"data": {"path": str(path), **data}})
    checked = check(cfg, tokenizer)
    return fingerprint(checked.table, format=checked.spec.name, tokenizer_id=tokenizer_fingerprint(tokenizer),
                       max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length)


def test_same_content_same_fingerprint_whatever_the_container(tmp_path, tiny_tokenizer):
    base = fp(write_jsonl(tmp_path / "a.jsonl", ROWS), tiny_tokenizer)
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "renamed.parquet")
    assert fp(tmp_path / "renamed.parquet", tiny_tokenizer) == base
    extra = [{**r, "id": f"x{i}"} for i, r in enumerate(ROWS)]
    assert fp(write_jsonl(tmp_path / "b.jsonl", extra), tiny_tokenizer, ignore_columns=["id"]) == base
    assert fp(tmp_path / "a.jsonl", tiny_tokenizer, on_bad_row="skip") == base
    # A bad row that is skipped leaves the tokenized data, hence the fingerprint, unchanged.
    with_bad = [ROWS[0], {**ROWS[1], "rejected": ROWS[1]["chosen"]}, ROWS[1], ROWS[2]]
    assert fp(write_jsonl(tmp_path / "c.jsonl", with_bad), tiny_tokenizer, on_bad_row="skip") == base
    # A tokenizer loaded twice is the same tokenizer.
    assert tokenizer_fingerprint(copy.deepcopy(tiny_tokenizer)) == tokenizer_fingerprint(tiny_tokenizer)


def test_any_changed_input_changes_the_fingerprint(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", ROWS)
    base = fp(path, tiny_tokenizer)
    one_char = copy.deepcopy(ROWS)
    one_char[2]["rejected"] = " is wooden at best!"
    template = copy.deepcopy(tiny_tokenizer)
    template.chat_template = tiny_tokenizer.chat_template.replace("'\\n'", "'\\n\\n'")
    other_vocab = build_tokenizer(load_reviews(limit=500), vocab_size=600)
    variants = {
        "one character": fp(write_jsonl(tmp_path / "b.jsonl", one_char), tiny_tokenizer),
        "row order": fp(write_jsonl(tmp_path / "c.jsonl", ROWS[::-1]), tiny_tokenizer),
        "one row fewer": fp(path, tiny_tokenizer, num_examples=2),
        "max_length": fp(path, tiny_tokenizer, max_length=300),
        "max_prompt_length": fp(path, tiny_tokenizer, max_prompt_length=65),
        "chat template": fp(path, template),
        "vocabulary": fp(path, other_vocab),
    }
    assert base not in variants.values()
    assert len(set(variants.values())) == len(variants)
    table = check(RunConfig.model_validate({"data": {"path": str(path)}}), tiny_tokenizer).table
    kw = dict(tokenizer_id="t", max_length=256, max_prompt_length=64)
    assert fingerprint(table, format="preference", **kw) != fingerprint(table, format="implicit_prompt", **kw)


def test_fingerprint_is_the_same_in_another_process(tmp_path, tiny_tokenizer, tiny_model_dir):
    td = prepare(RunConfig.model_validate({"data": {"path": str(write_jsonl(tmp_path / "a.jsonl", ROWS))}}),
                 tiny_tokenizer, tmp_path / "out")
    code = (
        "import sys; from transformers import AutoTokenizer; from prefopt.config import RunConfig; "
        "from prefopt.data import prepare; "
        f"t = AutoTokenizer.from_pretrained({str(tiny_model_dir)!r}); "
        f"cfg = RunConfig.model_validate({{'data': {{'path': {str(tmp_path / 'a.jsonl')!r}}}}}); "
        f"print(prepare(cfg, t, {str(tmp_path / 'out2')!r}).fingerprint)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == td.fingerprint


def test_written_once_reopened_from_the_path_and_pickled_as_the_path(tmp_path, tiny_tokenizer):
    cfg = RunConfig.model_validate({"data": {"path": str(write_jsonl(tmp_path / "a.jsonl", ROWS))}})
    td = prepare(cfg, tiny_tokenizer, tmp_path / "out")
    stamp = (td.path / "examples.arrow").stat().st_mtime_ns
    again = prepare(cfg, tiny_tokenizer, tmp_path / "out")
    assert again.path == td.path and (td.path / "examples.arrow").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [td.path.name]  # no temp dirs left

    reopened = TokenizedData.open(td.path)
    assert (reopened.fingerprint, reopened.format, reopened.num_rows) == (td.fingerprint, "preference", 3)
    assert reopened.report.rows_kept == 3 and reopened.pad_token_id == tiny_tokenizer.pad_token_id
    assert reopened.rows([2, 0]) == td.rows([2, 0])
    assert [r["index"] for r in reopened.rows([2, 0])] == [2, 0]
    shipped = pickle.loads(pickle.dumps(td))
    assert len(pickle.dumps(td)) < 500  # the path, not the data
    assert shipped.rows([1]) == td.rows([1])

    changed = RunConfig.model_validate({"data": {"path": str(tmp_path / "a.jsonl"), "max_length": 128}})
    assert prepare(changed, tiny_tokenizer, tmp_path / "out").path != td.path

"""A deterministic fingerprint of tokenized data: it changes when an input changes, and only then.

Inputs: the token ids and labels of every kept example (in order), the tokenizer (vocabulary,
merges, special tokens, chat template), `max_length`, `max_prompt_length` and the format.
Not inputs: where the data came from (the same rows in JSONL or Parquet give the same
fingerprint), source row numbers, the report, dropped rows. The reference log-prob cache is
keyed by it, so a changed input is a cache miss and an unchanged one is never recomputed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable

import numpy as np
import pyarrow as pa

# Bump when tokenization rules change in a way that changes ids for the same inputs.
PIPELINE_VERSION = "prefopt-data-1"
# Metadata columns that do not change what a model sees.
_NOT_CONTENT = ("row",)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides a tokenizer's output: its serialized model, specials, template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # Padding/truncation are call-time settings that HF tokenizers leave in the backend.
        state.pop("padding", None)
        state.pop("truncation", None)
    else:  # a pure-Python tokenizer: its vocabulary is the best description we have
        state = sorted(tokenizer.get_vocab().items())
    described = {
        "class": type(tokenizer).__name__,
        "state": state,
        "specials": {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
        "chat_template": tokenizer.chat_template,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _put(h, data: bytes) -> None:
    # Length-prefixed, so that no two different sequences of parts hash the same bytes.
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def _is_list(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) or pa.types.is_large_list(kind)


def _hash_list_column(h, chunks: Callable[[], Iterable[pa.Array]]) -> None:
    # The bytes the whole column would give (offsets from 0, then the ids as int64), hashed chunk
    # by chunk: no chunk is combined with another, so memory is one chunk's and no column runs
    # into Arrow's 2^31 limit on one list array's ids.
    rows = ids = 0
    for array in chunks():
        rows, ids = rows + len(array), ids + array.offsets[-1].as_py() - array.offsets[0].as_py()
    h.update(((rows + 1) * 8).to_bytes(8, "little"))
    h.update(np.zeros(1, dtype=np.int64).tobytes())
    base = 0
    for array in chunks():
        offsets = np.asarray(array.offsets, dtype=np.int64)
        h.update((offsets[1:] - offsets[0] + base).tobytes())
        base += int(offsets[-1] - offsets[0])
    h.update((ids * 8).to_bytes(8, "little"))
    for array in chunks():
        h.update(np.asarray(array.flatten(), dtype=np.int64).tobytes())


def _hash_json_column(h, chunks: Callable[[], Iterable[pa.Array]]) -> None:
    # json.dumps of the whole column's list is "[" + the chunks' items joined by ", " + "]".
    def pieces():
        return (json.dumps(a.to_pylist())[1:-1].encode() for a in chunks() if len(a))

    sizes = [len(p) for p in pieces()]
    h.update((2 + sum(sizes) + 2 * max(len(sizes) - 1, 0)).to_bytes(8, "little"))
    h.update(b"[")
    for i, piece in enumerate(pieces()):
        h.update(b", " + piece if i else piece)
    h.update(b"]")


def fingerprint_tables(tables: Callable[[], Iterable[pa.Table]], *, format: str, tokenizer_id: str,
                       max_length: int, max_prompt_length: int) -> str:
    """Hex sha256 of the tokenized data that `tables()` yields in order (fresh each call: a
    prepared corpus is read back part by part, never held whole), plus the settings that produced
    it. Equal to the fingerprint of the one table they concatenate, however they are cut."""
    first, rows = None, 0
    for table in tables():
        first = first or table.schema
        rows += table.num_rows
    if first is None:
        raise ValueError("fingerprint_tables: no tables")
    h = hashlib.sha256()
    header = {"version": PIPELINE_VERSION, "format": format, "tokenizer": tokenizer_id,
              "max_length": max_length, "max_prompt_length": max_prompt_length, "rows": rows}
    _put(h, json.dumps(header, sort_keys=True).encode())
    for name in sorted(first.names):
        if name in _NOT_CONTENT:
            continue
        _put(h, name.encode())

        def chunks(name=name):
            return (chunk for table in tables() for chunk in table[name].chunks)

        if _is_list(first.field(name).type):
            _hash_list_column(h, chunks)
        else:
            _hash_json_column(h, chunks)
    return h.hexdigest()


def fingerprint(table: pa.Table, *, format: str, tokenizer_id: str, max_length: int,
                max_prompt_length: int) -> str:
    """Hex sha256 of a tokenized table plus the settings that produced it."""
    return fingerprint_tables(lambda: [table], format=format, tokenizer_id=tokenizer_id,
                              max_length=max_length, max_prompt_length=max_prompt_length)

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


def _hash_column(h, column: pa.ChunkedArray) -> None:
    array = column.combine_chunks()
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        # Offsets (normalised to start at 0) say where each row ends; values are the ids.
        offsets = np.asarray(array.offsets, dtype=np.int64)
        _put(h, (offsets - offsets[0]).tobytes())
        _put(h, np.asarray(array.flatten(), dtype=np.int64).tobytes())
    else:
        _put(h, json.dumps(array.to_pylist()).encode())


def fingerprint(table: pa.Table, *, format: str, tokenizer_id: str, max_length: int,
                max_prompt_length: int) -> str:
    """Hex sha256 of a tokenized table plus the settings that produced it."""
    h = hashlib.sha256()
    header = {"version": PIPELINE_VERSION, "format": format, "tokenizer": tokenizer_id,
              "max_length": max_length, "max_prompt_length": max_prompt_length,
              "rows": table.num_rows}
    _put(h, json.dumps(header, sort_keys=True).encode())
    for name in sorted(table.column_names):
        if name in _NOT_CONTENT:
            continue
        _put(h, name.encode())
        _hash_column(h, table[name])
    return h.hexdigest()

"""What a cache of reference log-probs depends on, as named parts, and one fingerprint of them.

Parts (all strings, so that a manifest can show them and a mismatch can name them):
    data               fingerprint of the tokenized data (prefopt.data.fingerprint)
    reference_weights  content hash of the reference model's weight files (weights_fingerprint)
    tokenizer          prefopt.data.fingerprint.tokenizer_fingerprint
    max_length         max tokens of prompt + completion
    max_prompt_length  max tokens of the prompt
    dtype              dtype the reference model computes in ("bfloat16", "float32", ...)
The data fingerprint already covers the tokenizer and the lengths; they are parts of their own
anyway, so that a miss can say which input changed.

Cost of weights_fingerprint: one sequential read of every weight file, hashed with sha256
(about 1.5 GB/s on one core with SHA extensions): a 16 GB model costs ~11 s of CPU plus the time
to read 16 GB (~30 s at 500 MB/s, minutes from network storage). Each file's hash is remembered
per (path, size, mtime_ns, ctime_ns) in a sidecar under $PREFOPT_CACHE_DIR (default
~/.cache/prefopt) and in process, so later runs cost one stat() per file. A file modified less
than 2 s before it was hashed is not remembered (a rewrite within one timestamp tick would
keep its stat), so a freshly saved model is hashed on each use until it settles.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from pathlib import Path

# Bump when the layout or meaning of a cache changes: every old cache becomes a miss.
CACHE_VERSION = "prefopt-refcache-1"
PART_NAMES = ("data", "reference_weights", "tokenizer", "max_length", "max_prompt_length", "dtype")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "config.json")
_CHUNK = 8 << 20  # bytes read per hash update: large enough to be I/O bound, small in memory
# A file changed less than this before hashing is hashed again next time, not remembered:
# timestamps tick coarsely (ms), so a rewrite in the same tick keeps its stat ("racy git").
_SETTLE_NS = 2_000_000_000

# (absolute path, size, mtime_ns, ctime_ns) -> sha256 hex of the file, for this process.
_memo: dict[tuple[str, int, int, int], str] = {}


def fingerprint_parts(data_fingerprint: str, model_dir: str | os.PathLike, tokenizer_fingerprint: str,
                      max_length: int, max_prompt_length: int, dtype: str) -> dict[str, str]:
    """The named inputs of a reference log-prob cache (see the module docstring)."""
    for name, value in (("data_fingerprint", data_fingerprint), ("tokenizer_fingerprint", tokenizer_fingerprint),
                        ("dtype", dtype)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"fingerprint_parts: {name} must be a non-empty string, got {value!r}")
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"fingerprint_parts: {name} must be a positive int, got {value!r}")
    return {
        "data": data_fingerprint,
        "reference_weights": weights_fingerprint(model_dir),
        "tokenizer": tokenizer_fingerprint,
        "max_length": str(max_length),
        "max_prompt_length": str(max_prompt_length),
        "dtype": dtype,
    }


def check_parts(parts: dict[str, str]) -> None:
    """Exactly the named parts, each a string: a forgotten part would be a silent reuse."""
    if not isinstance(parts, dict) or set(parts) != set(PART_NAMES):
        got = sorted(parts) if isinstance(parts, dict) else type(parts).__name__
        raise ValueError(f"ref cache parts must have exactly the keys {list(PART_NAMES)} "
                         f"(use prefopt.refcache.fingerprint_parts), got {got}")
    bad = [k for k, v in parts.items() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"ref cache parts must be strings; not strings: {bad}")


def combine(parts: dict[str, str]) -> str:
    """Hex sha256 of the cache format version and every part."""
    check_parts(parts)
    described = {"version": CACHE_VERSION, "parts": parts}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def differing(old: dict, new: dict) -> list[str]:
    """Names of the parts whose values differ (a part missing on one side differs)."""
    names = list(PART_NAMES) + sorted((set(old) | set(new)) - set(PART_NAMES))
    return [k for k in names if old.get(k) != new.get(k)]


def weights_fingerprint(model_dir: str | os.PathLike) -> str:
    """Hex sha256 over the names and contents of a model's weight files and config.json.

    Files: *.safetensors, *.bin and config.json at the top of `model_dir` (the Hugging Face
    layout); symlinks (hub snapshots) are followed. Names are relative, so a moved or copied
    model has the same fingerprint. Raises FileNotFoundError if there are no weight files.
    """
    model_dir = Path(model_dir).resolve()
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: not a directory (reference model)")
    files = sorted({p for pattern in WEIGHT_PATTERNS for p in model_dir.glob(pattern) if p.is_file()})
    if not any(p.name != "config.json" for p in files):
        raise FileNotFoundError(f"{model_dir}: no weight files ({', '.join(WEIGHT_PATTERNS[:2])})")
    sidecar = _sidecar_file(model_dir)
    known = _read_sidecar(sidecar)
    h = hashlib.sha256()
    entries = {}
    now = time.time_ns()
    for path in files:
        st = path.stat()
        # mtime_ns and ctime_ns: a rewrite with the same size is detected even if a tool restores
        # the mtime (ctime cannot be set from user space). A touch costs a rehash, not a miss.
        key = (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}
        digest = _memo.get(key)
        record = known.get(path.name)
        if digest is None and isinstance(record, dict) and record.get("stat") == entry:
            digest = record.get("sha256") if isinstance(record.get("sha256"), str) else None
        if digest is None:
            digest = _hash_file(path)
        if now - max(st.st_mtime_ns, st.st_ctime_ns) >= _SETTLE_NS:
            _memo[key] = digest
            entries[path.name] = {"stat": entry, "sha256": digest}
        h.update(json.dumps([path.name, digest]).encode() + b"\n")
    if entries != known:
        _write_sidecar(sidecar, model_dir, entries)
    return h.hexdigest()


def _hash_file(path: Path) -> str:
    # Streamed: memory stays at one chunk whatever the file size.
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _sidecar_file(model_dir: Path) -> Path:
    # Outside the model directory: models are often read-only (hub caches, shared storage).
    root = Path(os.environ.get("PREFOPT_CACHE_DIR", "~/.cache/prefopt")).expanduser()
    return root / "weights-sha256" / f"{hashlib.sha256(str(model_dir).encode()).hexdigest()[:16]}.json"


def _read_sidecar(path: Path) -> dict:
    try:
        files = json.loads(path.read_text())["files"]
        return files if isinstance(files, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # absent or unreadable: hash again


def _write_sidecar(path: Path, model_dir: Path, entries: dict) -> None:
    # Best effort: a read-only home only costs a rehash next run. Written to a unique temporary
    # name then renamed, so concurrent runs never read a torn file (the last writer wins).
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"model_dir": str(model_dir), "files": entries}, indent=1))
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)

"""The reference weights fingerprint follows content, not timestamps; the parts are exactly named."""

import hashlib
import json
import os

import pytest

from prefopt.refcache import PART_NAMES, fingerprint, fingerprint_parts, weights_fingerprint


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    # Sidecars in the test's folder, not ~/.cache; no memory of other tests' files.
    monkeypatch.setenv("PREFOPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(fingerprint, "_memo", {})


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (d / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (d / "tokenizer.json").write_text("{}")  # not a weight file
    return d


@pytest.fixture
def hash_calls(monkeypatch):
    """Counts files read for hashing."""
    calls = []
    real = fingerprint._hash_file
    monkeypatch.setattr(fingerprint, "_hash_file", lambda path: calls.append(path.name) or real(path))
    return calls


def rewrite_byte(path, offset=100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))  # same size


def test_weights_fingerprint_is_the_content_hash(model_dir):
    # Worked out independently: sha256 over one JSON line [name, sha256(content)] per file, by name.
    lines = b"".join(json.dumps([name, hashlib.sha256((model_dir / name).read_bytes()).hexdigest()]).encode()
                     + b"\n" for name in ("config.json", "model.safetensors"))
    assert weights_fingerprint(model_dir) == hashlib.sha256(lines).hexdigest()


def test_one_changed_byte_changes_it_and_a_touch_does_not(model_dir):
    before = weights_fingerprint(model_dir)
    st = (model_dir / "model.safetensors").stat()
    os.utime(model_dir / "model.safetensors", ns=(st.st_atime_ns + 10**9, st.st_mtime_ns + 10**9))
    assert weights_fingerprint(model_dir) == before
    rewrite_byte(model_dir / "model.safetensors")
    assert weights_fingerprint(model_dir) != before
    rewrite_byte(model_dir / "model.safetensors")  # back to the original bytes
    assert weights_fingerprint(model_dir) == before


def test_config_and_extra_weight_files_count_other_files_do_not(model_dir):
    before = weights_fingerprint(model_dir)
    (model_dir / "tokenizer.json").write_text('{"changed": true}')
    assert weights_fingerprint(model_dir) == before
    (model_dir / "config.json").write_text(json.dumps({"hidden_size": 16}))
    changed_config = weights_fingerprint(model_dir)
    assert changed_config != before
    (model_dir / "pytorch_model.bin").write_bytes(b"\0" * 10)
    assert weights_fingerprint(model_dir) != changed_config


def test_a_moved_model_has_the_same_fingerprint(model_dir, tmp_path):
    before = weights_fingerprint(model_dir)
    moved = model_dir.rename(tmp_path / "elsewhere")
    assert weights_fingerprint(moved) == before


def test_no_weight_files_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no weight files"):
        weights_fingerprint(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        weights_fingerprint(tmp_path / "absent")


def test_settled_files_are_hashed_once_per_stat_across_processes(model_dir, hash_calls, monkeypatch):
    monkeypatch.setattr(fingerprint, "_SETTLE_NS", 0)  # treat just-written files as settled
    first = weights_fingerprint(model_dir)
    assert sorted(hash_calls) == ["config.json", "model.safetensors"]
    assert weights_fingerprint(model_dir) == first
    assert len(hash_calls) == 2  # remembered in process
    monkeypatch.setattr(fingerprint, "_memo", {})  # a new process: only the sidecar remains
    assert weights_fingerprint(model_dir) == first
    assert len(hash_calls) == 2
    sidecars = list((model_dir.parent / "cache" / "weights-sha256").glob("*.json"))
    assert len(sidecars) == 1 and json.loads(sidecars[0].read_text())["model_dir"] == str(model_dir.resolve())


def test_a_same_size_rewrite_is_detected_through_the_memo(model_dir, hash_calls, monkeypatch):
    monkeypatch.setattr(fingerprint, "_SETTLE_NS", 0)
    weights = model_dir / "model.safetensors"
    os.utime(weights, ns=(10**18, 10**18))
    before = weights_fingerprint(model_dir)
    rewrite_byte(weights)
    os.utime(weights, ns=(10**18, 10**18 + 1))  # only the nanoseconds of mtime differ
    assert weights_fingerprint(model_dir) != before
    assert hash_calls.count("model.safetensors") == 2


def test_a_rewrite_that_restores_the_mtime_is_detected(model_dir, hash_calls):
    # Freshly written files are not remembered (one timestamp tick may hold two writes, so
    # their stat can be equal), hence even a rewrite that puts back the old mtime is hashed again.
    weights = model_dir / "model.safetensors"
    before = weights_fingerprint(model_dir)
    st = weights.stat()
    rewrite_byte(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights_fingerprint(model_dir) != before
    assert hash_calls.count("model.safetensors") == 2
    assert not (model_dir.parent / "cache").exists()  # nothing remembered yet


def test_a_corrupt_sidecar_is_ignored(model_dir, monkeypatch):
    monkeypatch.setattr(fingerprint, "_SETTLE_NS", 0)
    before = weights_fingerprint(model_dir)
    (sidecar,) = (model_dir.parent / "cache" / "weights-sha256").glob("*.json")
    for text in ("{not json", json.dumps({"files": {"model.safetensors": "x"}}), json.dumps([1])):
        sidecar.write_text(text)
        monkeypatch.setattr(fingerprint, "_memo", {})
        assert weights_fingerprint(model_dir) == before


def test_fingerprint_parts(model_dir):
    parts = fingerprint_parts("d" * 64, model_dir, "t" * 64, 512, 256, "bfloat16")
    assert list(parts) == list(PART_NAMES)
    assert parts == {"data": "d" * 64, "reference_weights": weights_fingerprint(model_dir), "tokenizer": "t" * 64,
                     "max_length": "512", "max_prompt_length": "256", "dtype": "bfloat16"}
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        fingerprint_parts("d", model_dir, "t", 0, 256, "bfloat16")
    with pytest.raises(ValueError, match="dtype must be a non-empty string"):
        fingerprint_parts("d", model_dir, "t", 512, 256, "")


def test_a_saved_hugging_face_model(tiny_model_dir, tmp_path):
    parts = fingerprint_parts("d", tiny_model_dir, "t", 64, 32, "float32")
    weights = {p.name for p in tiny_model_dir.iterdir() if p.suffix in (".safetensors", ".bin")}
    assert weights and len(parts["reference_weights"]) == 64
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in [*weights, "config.json"]:
        (copy / name).write_bytes((tiny_model_dir / name).read_bytes())
    assert weights_fingerprint(copy) == parts["reference_weights"]

"""RefCache: exact round trips, resumable shards, atomic writes, misses named by the part that changed,
shards changed or truncated after writing detected and never used."""

import json
import pickle
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from prefopt import shards
from prefopt.refcache import PART_NAMES, RefCache, RefCacheIncomplete, RefCacheMismatch, Shard, store

PARTS = {"data": "3f2a" + "0" * 60, "reference_weights": "ab" * 32, "tokenizer": "cd" * 32,
         "max_length": "512", "max_prompt_length": "256", "dtype": "bfloat16"}
ROLES = ["chosen", "rejected"]


def logps(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {role: (rng.standard_normal(n) * 50 - 100).astype(np.float32) for role in ROLES}


def open_cache(root, parts=PARTS, num_rows=10, roles=ROLES, **kw) -> RefCache:
    return RefCache.open(str(root), parts, num_rows=num_rows, roles=roles, **kw)


def fill(cache: RefCache, values: dict[str, np.ndarray], shards=None) -> None:
    for shard in cache.shards() if shards is None else shards:
        cache.write_shard(shard, {role: v[shard.start:shard.stop] for role, v in values.items()})


def files(cache: RefCache) -> list[str]:
    return sorted(p.name for p in Path(cache.uri).iterdir())


# ------------------------------------------------------------------------------ round trip, layout


def test_round_trip_is_exact(tmp_path):
    cache = open_cache(tmp_path, num_rows=10, shard_rows=4)
    assert cache.shards() == [Shard(0, 0, 4), Shard(1, 4, 8), Shard(2, 8, 10)]
    values = logps(10)
    values["chosen"][:4] = [-0.0, 1e-45, -3.4e38, np.float32(-1234.5678)]  # sign of zero, subnormal, extremes
    fill(cache, values)
    assert cache.is_complete() and cache.missing_shards() == []
    got = pickle.loads(pickle.dumps(open_cache(tmp_path, num_rows=10))).read()  # as a Ray task would
    assert list(got) == ROLES
    for role in ROLES:
        assert got[role].dtype == np.float32 and got[role].shape == (10,)
        assert np.array_equal(got[role].view(np.uint32), values[role].view(np.uint32))  # bit for bit


def test_float64_and_torch_values_are_stored_as_float32(tmp_path):
    import torch

    cache = open_cache(tmp_path, num_rows=3, roles=["completion", "kl"])
    completion = np.array([-1.0000001, -2.5, -1e-3])  # float64
    kl = torch.tensor([-4.0, -5.0, -6.0], dtype=torch.bfloat16)
    cache.write_shard(cache.shards()[0], {"completion": completion, "kl": kl})
    got = cache.read()
    np.testing.assert_array_equal(got["completion"], completion.astype(np.float32))
    np.testing.assert_array_equal(got["kl"], [-4.0, -5.0, -6.0])


def test_layout_and_manifest(tmp_path):
    cache = open_cache(tmp_path, num_rows=10, shard_rows=4)
    fingerprint = store.combine(PARTS)
    assert cache.fingerprint == fingerprint and cache.uri == str(tmp_path / fingerprint[:16])
    fill(cache, logps(10))
    assert files(cache) == ["manifest.json", "shard-000000.parquet", "shard-000001.parquet", "shard-000002.parquet"]
    m = json.loads((tmp_path / fingerprint[:16] / "manifest.json").read_text())
    assert m["fingerprint"] == fingerprint and m["parts"] == PARTS
    assert m["num_rows"] == 10 and m["roles"] == ROLES and m["values_dtype"] == "float32" and m["shard_rows"] == 4
    assert [(s["file"], s["num_rows"]) for s in m["shards"]] == [
        ("shard-000000.parquet", 4), ("shard-000001.parquet", 4), ("shard-000002.parquet", 2)]
    assert set(m["versions"]) == {"prefopt", "torch", "transformers", "pyarrow"} and m["versions"]["pyarrow"]
    assert m["created"].endswith("+00:00")
    # A shard is a plain Parquet file: one float32 column per role.
    table = pq.read_table(tmp_path / fingerprint[:16] / "shard-000002.parquet")
    assert table.column_names == ROLES and table.num_rows == 2
    assert all(table.schema.field(r).type == pa.float32() for r in ROLES)


def test_an_existing_cache_keeps_its_shard_rows(tmp_path):
    open_cache(tmp_path, num_rows=10, shard_rows=4)
    assert open_cache(tmp_path, num_rows=10, shard_rows=8).shard_rows == 4


def test_empty_data(tmp_path):
    cache = open_cache(tmp_path, num_rows=0)
    assert cache.shards() == [] and cache.is_complete()
    assert {k: v.shape for k, v in cache.read().items()} == {"chosen": (0,), "rejected": (0,)}


# ------------------------------------------------------------------------------ resumable, atomic


def test_missing_shards_after_partial_writes(tmp_path):
    cache = open_cache(tmp_path, num_rows=10, shard_rows=3)
    values = logps(10)
    assert [s.index for s in cache.missing_shards()] == [0, 1, 2, 3]
    fill(cache, values, [cache.shards()[0], cache.shards()[2]])
    assert [s.index for s in cache.missing_shards()] == [1, 3]
    assert not cache.is_complete()
    with pytest.raises(RefCacheIncomplete, match=r"2 of 4 shards to compute \(shard-000001.parquet \(rows 3..5\): "
                                                 r"absent; shard-000003.parquet \(rows 9..9\): absent\)"):
        cache.read()
    resumed = open_cache(tmp_path, num_rows=10, shard_rows=3)  # another run: same cache, same gaps
    assert resumed.uri == cache.uri and resumed.missing_shards() == [Shard(1, 3, 6), Shard(3, 9, 10)]
    fill(resumed, values, resumed.missing_shards())
    np.testing.assert_array_equal(resumed.read()["rejected"], values["rejected"])


def test_a_leftover_temp_file_is_never_read_and_is_replaced(tmp_path):
    cache = open_cache(tmp_path, num_rows=8, shard_rows=4)
    values = logps(8)
    fill(cache, values, cache.shards()[:1])
    leftover = tmp_path / cache.fingerprint[:16] / f".shard-000001.parquet.{uuid.uuid4().hex}.tmp"
    leftover.write_bytes(b"PAR1 half a shard")  # what a crash in the middle of a write leaves
    assert cache.missing_shards() == [Shard(1, 4, 8)]
    with pytest.raises(RefCacheIncomplete):
        cache.read()
    fill(cache, values, cache.missing_shards())
    assert not leftover.exists()
    np.testing.assert_array_equal(cache.read()["chosen"], values["chosen"])


def test_a_failed_write_leaves_no_shard(tmp_path, monkeypatch):
    cache = open_cache(tmp_path, num_rows=4, shard_rows=4)

    def write_half_then_fail(table, where, filesystem):
        with filesystem.open_output_stream(where) as f:
            f.write(b"PAR1")
        raise OSError("disk full")

    monkeypatch.setattr(shards.pq, "write_table", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        fill(cache, logps(4))
    assert files(cache) == ["manifest.json"]  # no shard, and the temp file was removed
    assert cache.missing_shards() == cache.shards()


def test_a_killed_precompute_resumes_with_the_missing_shards(tmp_path):
    # A real process, killed (os._exit) while writing its second shard: no cleanup runs.
    script = textwrap.dedent(f"""
        import os, numpy as np
        from prefopt import shards
        from prefopt.refcache import RefCache
        cache = RefCache.open({str(tmp_path)!r}, {PARTS!r}, num_rows=12, roles={ROLES!r}, shard_rows=4)
        real = shards.pq.write_table
        def killed_on_second(table, where, filesystem):
            if "shard-000001" in where:
                with filesystem.open_output_stream(where) as f:
                    f.write(b"PAR1 truncated")
                os._exit(9)
            real(table, where, filesystem=filesystem)
        shards.pq.write_table = killed_on_second
        for shard in cache.shards():
            cache.write_shard(shard, {{r: np.full(shard.num_rows, -1.0) for r in {ROLES!r}}})
    """)
    assert subprocess.run([sys.executable, "-c", script], timeout=120).returncode == 9
    cache = open_cache(tmp_path, num_rows=12, shard_rows=4)
    assert any(name.endswith(".tmp") for name in files(cache))
    assert cache.missing_shards() == [Shard(1, 4, 8), Shard(2, 8, 12)]
    fill(cache, {r: np.full(12, -1.0, dtype=np.float32) for r in ROLES}, cache.missing_shards())
    assert not any(name.endswith(".tmp") for name in files(cache))
    np.testing.assert_array_equal(cache.read()["chosen"], np.full(12, -1.0, dtype=np.float32))


def test_a_shard_from_another_cache_is_missing_and_refused_on_read(tmp_path):
    ours = open_cache(tmp_path, num_rows=4)
    other = open_cache(tmp_path, {**PARTS, "dtype": "float32"}, num_rows=4)
    fill(other, logps(4))
    (tmp_path / ours.fingerprint[:16] / "shard-000000.parquet").write_bytes(
        (tmp_path / other.fingerprint[:16] / "shard-000000.parquet").read_bytes())
    problems = ours.check()  # present by name, but the footer says whose rows these are
    assert list(problems) == [Shard(0, 0, 4)] and "copied from another cache" in problems[Shard(0, 0, 4)]
    with pytest.raises(RefCacheIncomplete, match="shard-000000.parquet .*copied from another cache"):
        ours.read()
    (tmp_path / ours.fingerprint[:16] / "shard-000000.parquet").write_bytes(b"not parquet")
    with pytest.raises(RefCacheIncomplete, match="shard-000000.parquet .*unreadable, truncated or not Parquet"):
        ours.read()


# ------------------------------------------------------------------------------ integrity


def change_one_value(read, write, role="chosen", row=1):
    """Rewrite a shard with pyarrow, one value changed: still valid Parquet, same name, same footer."""
    table = read()
    values = table[role].to_numpy().copy()
    values[row] += 0.5
    write(table.set_column(table.column_names.index(role), role, pa.array(values, type=pa.float32())))


def local_shard(cache: RefCache, index: int) -> Path:
    return Path(cache.uri) / cache.shards()[index].file_name


def test_an_untouched_cache_verifies(tmp_path):
    cache = open_cache(tmp_path, num_rows=10, shard_rows=4)
    values = logps(10)
    fill(cache, values)
    assert cache.check() == {} and cache.missing_shards() == [] and cache.is_complete()
    cache.verify()
    footer = json.loads(pq.read_schema(local_shard(cache, 1)).metadata[store.KIND.encode()])
    assert footer["values_sha256"] == shards.values_sha256(pa.table({r: v[4:8] for r, v in values.items()}))
    np.testing.assert_array_equal(cache.read()["rejected"], values["rejected"])


def test_a_shard_with_changed_values_is_missing_and_never_read(tmp_path):
    cache = open_cache(tmp_path, num_rows=12, shard_rows=4)
    values = logps(12)
    fill(cache, values)
    path = local_shard(cache, 1)
    untouched = {i: local_shard(cache, i).read_bytes() for i in (0, 2)}
    change_one_value(lambda: pq.read_table(path), lambda t: pq.write_table(t, path))
    assert pq.read_table(path).num_rows == 4  # still valid Parquet, footer kept
    assert cache.check() == {Shard(1, 4, 8): "checksum mismatch: its values changed after it was written"}
    assert cache.missing_shards() == [Shard(1, 4, 8)] and not cache.is_complete()
    with pytest.raises(RefCacheIncomplete, match=r"shard-000001.parquet \(rows 4..7\): checksum mismatch"):
        cache.read()
    with pytest.raises(RefCacheIncomplete, match="checksum mismatch"):
        cache.verify()
    fill(cache, values, cache.missing_shards())  # recomputed: only the bad shard is rewritten
    assert {i: local_shard(cache, i).read_bytes() for i in (0, 2)} == untouched
    assert cache.check() == {}
    np.testing.assert_array_equal(cache.read()["chosen"], values["chosen"])


def test_a_truncated_shard_is_missing_and_never_read(tmp_path):
    cache = open_cache(tmp_path, num_rows=12, shard_rows=4)
    values = logps(12)
    fill(cache, values)
    path = local_shard(cache, 2)
    data = path.read_bytes()
    for length in (len(data) - 1, len(data) // 2, 0):
        path.write_bytes(data[:length])
        why = cache.check()[Shard(2, 8, 12)]
        assert list(cache.check()) == [Shard(2, 8, 12)] and why.startswith("unreadable, truncated or not Parquet (")
        assert "\n" not in why  # one line
        with pytest.raises(RefCacheIncomplete, match="shard-000002.parquet .*truncated"):
            cache.read()
    fill(cache, values, cache.missing_shards())
    assert cache.is_complete()
    np.testing.assert_array_equal(cache.read()["rejected"], values["rejected"])


@pytest.mark.parametrize("rewrite, why", [
    (lambda t: t.replace_schema_metadata(None), "not written by prefopt.refcache (no footer metadata)"),
    (lambda t: t.drop_columns(["rejected"]), "no float32 column 'rejected' (columns ['chosen'])"),
    (lambda t: t.cast(pa.schema([pa.field(r, pa.float64()) for r in ROLES], metadata=t.schema.metadata)),
     "no float32 column 'chosen' (columns ['chosen', 'rejected'])"),
    (lambda t: t.slice(0, 3), "3 rows, expected 4"),
    (lambda t: pa.table({"chosen": t["rejected"], "rejected": t["chosen"]}).replace_schema_metadata(t.schema.metadata),
     "checksum mismatch: its values changed after it was written"),
], ids=["footer dropped", "column dropped", "float64", "rows dropped", "roles swapped"])
def test_a_shard_rewritten_otherwise_is_missing(tmp_path, rewrite, why):
    cache = open_cache(tmp_path, num_rows=8, shard_rows=4)
    fill(cache, logps(8))
    path = local_shard(cache, 0)
    pq.write_table(rewrite(pq.read_table(path)), path)
    assert cache.check() == {Shard(0, 0, 4): why}


def test_a_shard_of_the_previous_version_is_recomputed_not_trusted(tmp_path):
    # Written before checksums: the same footer without values_sha256.
    cache = open_cache(tmp_path, num_rows=8, shard_rows=4)
    values = logps(8)
    fill(cache, values)
    path = local_shard(cache, 0)
    table = pq.read_table(path)
    footer = json.loads(table.schema.metadata[store.KIND.encode()])
    del footer["values_sha256"]
    pq.write_table(table.replace_schema_metadata({store.KIND.encode(): json.dumps(footer).encode()}), path)
    assert cache.check() == {Shard(0, 0, 4): "no checksum (written before prefopt recorded checksums): "
                                             "cannot be verified"}
    with pytest.raises(RefCacheIncomplete, match="no checksum"):
        cache.read()
    fill(cache, values, cache.missing_shards())
    assert cache.is_complete()


# ------------------------------------------------------------------------------ misses and mismatches


@pytest.mark.parametrize("part", PART_NAMES)
def test_each_part_changed_alone_is_a_miss_named_by_nearest(tmp_path, part):
    values = logps(10)
    fill(open_cache(tmp_path), values)
    changed = {**PARTS, part: PARTS[part] + "-changed"}
    assert RefCache.nearest(str(tmp_path), changed) == (str(tmp_path / store.combine(PARTS)[:16]), [part])
    cache = open_cache(tmp_path, changed)
    assert cache.uri != str(tmp_path / store.combine(PARTS)[:16])
    assert cache.missing_shards() == cache.shards()  # nothing reused
    assert RefCache.nearest(str(tmp_path), changed) == (cache.uri, [])


def test_nearest_picks_the_cache_that_differs_least(tmp_path):
    assert RefCache.nearest(str(tmp_path / "absent"), PARTS) is None
    open_cache(tmp_path, {**PARTS, "data": "x", "tokenizer": "y"})
    near = open_cache(tmp_path, {**PARTS, "dtype": "float32"})
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "manifest.json").write_text("{broken")
    assert RefCache.nearest(str(tmp_path), PARTS) == (near.uri, ["dtype"])


def test_pointing_at_a_cache_for_other_inputs_names_each_differing_part(tmp_path):
    cache = open_cache(tmp_path)
    other = {**PARTS, "data": "9c1b" + "1" * 60, "max_length": "1024"}
    with pytest.raises(RefCacheMismatch) as e:
        open_cache(cache.uri, other)
    assert e.value.differing == ["data", "max_length"]
    assert str(e.value) == (f"ref cache {cache.uri} was computed for other inputs: "
                            f"data differs (cached 3f2a00000000.. vs now 9c1b11111111..), "
                            f"max_length differs (cached 512 vs now 1024)")
    assert open_cache(cache.uri).uri == cache.uri  # the same inputs: that very cache


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(num_rows=11), "holds 11 rows, the data has 10"),
    (lambda m: m.update(roles=["completion", "kl"]), r"holds roles \['completion', 'kl'\]"),
    (lambda m: m.update(fingerprint="0" * 64), "same parts but fingerprint"),
    (lambda m: m["parts"].update(tokenizer="other"), "tokenizer differs"),
    (lambda m: m.update(shard_rows=0), "shard_rows 0"),
])
def test_a_disagreeing_manifest_under_the_fingerprint_is_a_mismatch(tmp_path, edit, message):
    cache = open_cache(tmp_path)
    manifest_file = tmp_path / cache.fingerprint[:16] / "manifest.json"
    m = json.loads(manifest_file.read_text())
    edit(m)
    manifest_file.write_text(json.dumps(m))
    with pytest.raises(RefCacheMismatch, match=message):
        open_cache(tmp_path)


def test_an_unreadable_manifest_is_a_mismatch(tmp_path):
    cache = open_cache(tmp_path)
    (tmp_path / cache.fingerprint[:16] / "manifest.json").write_text('{"fingerprint": ')
    with pytest.raises(RefCacheMismatch, match="unreadable manifest.json"):
        open_cache(tmp_path)


def test_parts_must_be_exactly_the_named_ones(tmp_path):
    with pytest.raises(ValueError, match="exactly the keys"):
        open_cache(tmp_path, {k: v for k, v in PARTS.items() if k != "dtype"})
    with pytest.raises(ValueError, match="must be strings"):
        open_cache(tmp_path, {**PARTS, "max_length": 512})
    with pytest.raises(ValueError, match="distinct non-empty column names"):
        open_cache(tmp_path, roles=["chosen", "chosen"])


# ------------------------------------------------------------------------------ bad values


@pytest.mark.parametrize("values, message", [
    ({"chosen": np.zeros(4)}, r"missing \['rejected'\]"),
    ({"chosen": np.zeros(4), "rejected": np.zeros(4), "kl": np.zeros(4)}, r"unexpected \['kl'\]"),
    ({"chosen": np.zeros(3), "rejected": np.zeros(4)}, r"'chosen' has shape \(3,\), expected \(4,\)"),
    ({"chosen": np.zeros((4, 1)), "rejected": np.zeros(4)}, r"shape \(4, 1\)"),
    ({"chosen": np.zeros(4), "rejected": np.array([0, 1, np.nan, np.nan])},
     r"shard 1 \(rows 4..7\): 'rejected' is not finite in float32 at row 6 \(value .*nan.*\) and 1 more rows"),
    ({"chosen": np.array([0, 1e39, 0, 0]), "rejected": np.zeros(4)}, "not finite in float32 at row 5"),
    ({"chosen": np.array(["a"] * 4), "rejected": np.zeros(4)}, "expected real numbers"),
])
def test_bad_values_are_refused_and_nothing_is_written(tmp_path, values, message):
    cache = open_cache(tmp_path, num_rows=8, shard_rows=4)
    with pytest.raises(ValueError, match=message):
        cache.write_shard(cache.shards()[1], values)
    assert files(cache) == ["manifest.json"]


def test_a_shard_not_of_this_cache_is_refused(tmp_path):
    cache = open_cache(tmp_path, num_rows=8, shard_rows=4)
    with pytest.raises(ValueError, match="not a shard of this cache"):
        cache.write_shard(Shard(1, 3, 7), {r: np.zeros(4) for r in ROLES})


# ------------------------------------------------------------------------------ other filesystems


def test_a_file_uri_is_the_same_cache_as_the_local_path(tmp_path):
    values = logps(10)
    fill(open_cache(tmp_path), values, open_cache(tmp_path).shards()[:1])
    cache = open_cache(f"file://{tmp_path}")
    assert cache.uri == f"file://{tmp_path}/{cache.fingerprint[:16]}"
    assert cache.missing_shards() == []  # 10 rows, one shard of 4096: already written
    np.testing.assert_array_equal(cache.read()["chosen"], values["chosen"])


def test_an_object_store_like_filesystem(tmp_path):
    # fsspec's in-memory filesystem behind pyarrow: no real directories, move = copy + delete.
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(memory))
    root = f"bucket-{uuid.uuid4().hex}/refcache"
    try:
        cache = RefCache.open(root, PARTS, num_rows=10, roles=ROLES, shard_rows=4, filesystem=fs)
        values = logps(10)
        fill(cache, values, cache.shards()[:2])
        again = RefCache.open(root, PARTS, num_rows=10, roles=ROLES, filesystem=fs)
        assert again.missing_shards() == [Shard(2, 8, 10)]
        fill(again, values, again.missing_shards())
        got = again.read()
        assert all(np.array_equal(got[r], values[r]) for r in ROLES)
        assert not [p for p in memory.find(root) if p.endswith(".tmp")]
        with pytest.raises(RefCacheMismatch, match="dtype differs"):
            RefCache.open(again.uri, {**PARTS, "dtype": "float16"}, num_rows=10, roles=ROLES, filesystem=fs)
        assert RefCache.nearest(root, {**PARTS, "dtype": "float16"}, filesystem=fs) == (again.uri, ["dtype"])
    finally:
        memory.rm(root.split("/")[0], recursive=True)


def test_changed_and_truncated_shards_on_an_object_store_like_filesystem():
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(memory))
    root = f"bucket-{uuid.uuid4().hex}/refcache"
    try:
        cache = RefCache.open(root, PARTS, num_rows=12, roles=ROLES, shard_rows=4, filesystem=fs)
        values = logps(12)
        fill(cache, values)
        assert cache.check() == {}
        changed, truncated = (f"{cache.uri}/{cache.shards()[i].file_name}" for i in (0, 2))
        change_one_value(lambda: pq.read_table(changed, filesystem=fs),
                         lambda t: pq.write_table(t, changed, filesystem=fs))
        memory.pipe(truncated, memory.cat(truncated)[:-10])
        problems = cache.check()
        assert list(problems) == [Shard(0, 0, 4), Shard(2, 8, 12)]
        assert problems[Shard(0, 0, 4)].startswith("checksum mismatch")
        assert problems[Shard(2, 8, 12)].startswith("unreadable, truncated or not Parquet")
        with pytest.raises(RefCacheIncomplete, match="2 of 3 shards to compute"):
            cache.read()
        fill(cache, values, cache.missing_shards())
        got = cache.read()
        assert all(np.array_equal(got[r], values[r]) for r in ROLES)
    finally:
        memory.rm(root.split("/")[0], recursive=True)


def test_changed_and_truncated_shards_on_a_real_s3_server(s3):
    # The tests' S3-compatible server (tests/s3_server.py): move is a server-side copy there.
    root = s3.bucket(f"b-{uuid.uuid4().hex[:8]}") + "/refcache"
    cache = RefCache.open(root, PARTS, num_rows=12, roles=ROLES, shard_rows=4)
    assert cache.uri.startswith(f"{root}/")
    values = logps(12)
    fill(cache, values)
    assert cache.check() == {}
    fs, path = pafs.FileSystem.from_uri(cache.uri)
    changed, truncated = (f"{path}/{cache.shards()[i].file_name}" for i in (0, 2))
    change_one_value(lambda: pq.read_table(changed, filesystem=fs), lambda t: pq.write_table(t, changed, filesystem=fs))
    with fs.open_input_stream(truncated) as f:
        data = f.read()
    with fs.open_output_stream(truncated) as f:
        f.write(data[:-10])
    problems = open_cache(root, num_rows=12).check()  # another run, on the same store
    assert list(problems) == [Shard(0, 0, 4), Shard(2, 8, 12)]
    assert problems[Shard(0, 0, 4)].startswith("checksum mismatch")
    assert problems[Shard(2, 8, 12)].startswith("unreadable, truncated or not Parquet")
    with pytest.raises(RefCacheIncomplete, match="2 of 3 shards to compute"):
        cache.read()
    fill(cache, values, cache.missing_shards())
    assert all(np.array_equal(cache.read()[r], values[r]) for r in ROLES)
    assert not [info for info in fs.get_file_info(pafs.FileSelector(path)) if info.base_name.endswith(".tmp")]

"""RefCache integrity end to end: a shard changed or truncated after it was written is found,
recomputed alone, and never used; training then ends on the loss curve of the untouched cache."""

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from prefopt.algorithms.offline import train
from prefopt.algorithms.precompute_ref import precompute
from prefopt.config import load_config
from prefopt.data import prepare

ROOT = Path(__file__).resolve().parents[2]
TINY_DPO = ROOT / "configs/tiny/dpo.yaml"


def recording() -> Console:
    return Console(file=io.StringIO(), width=1000)  # wide: each report stays on one line


def config(tmp_path, model_dir, name):
    # One ref.cache_dir for every run; each run its own output_dir.
    return load_config(TINY_DPO, [f"model.path={model_dir}", "data.num_examples=40", f"output_dir={tmp_path}/{name}",
                                  f"ref.cache_dir={tmp_path}/refcache", "train.max_steps=3", "train.save_steps=1000",
                                  "eval.num_prompts=4", "eval.sampling.max_new_tokens=4"])


def losses(cfg, console) -> list[float]:
    train(cfg, console, resume=False)
    return [json.loads(line)["loss"] for line in Path(cfg.output_dir, "metrics.jsonl").open()]


def identity(path: Path) -> tuple[int, int, bytes]:
    # A file rewritten, even with the same bytes, gets another inode (a move) and mtime.
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, path.read_bytes()


def test_a_changed_or_truncated_shard_is_recomputed_alone(tmp_path, tiny_model_dir, tiny_tokenizer, ray_local):
    cfg = config(tmp_path, tiny_model_dir, "precompute")
    data = prepare(cfg, tiny_tokenizer, Path(cfg.output_dir) / "data")
    cache = precompute(cfg, tiny_model_dir, tiny_tokenizer, data, recording())
    expected = cache.read()
    files = [Path(cache.uri) / shard.file_name for shard in cache.shards()]
    assert len(files) >= 3 and cache.check() == {}
    reference_curve = losses(config(tmp_path, tiny_model_dir, "run-0"), recording())
    assert len(reference_curve) == 3

    # (a) One value changed, the file still valid Parquet with its footer: precompute recomputes it alone.
    changed = cache.shards()[1]
    table = pq.read_table(files[1])
    chosen = table["chosen"].to_numpy().copy()
    chosen[0] += 1.0
    pq.write_table(table.set_column(0, "chosen", pa.array(chosen, type=pa.float32())), files[1])
    assert list(cache.check()) == [changed]
    before = {f: identity(f) for f in files if f != files[1]}
    console = recording()
    repaired = precompute(cfg, tiny_model_dir, tiny_tokenizer, data, console)
    out = console.file.getvalue()
    assert f"{changed.file_name} (rows {changed.start}..{changed.stop - 1}): checksum mismatch" in out, out
    assert f"{changed.num_rows} of 40 rows left" in out, out
    assert {f: identity(f) for f in before} == before
    for role, values in repaired.read().items():
        np.testing.assert_array_equal(values, expected[role])

    # (b) A truncated shard: train's cache stage recomputes it alone, and ends on the same curve.
    truncated = cache.shards()[2]
    files[2].write_bytes(files[2].read_bytes()[:-100])
    assert list(cache.check()) == [truncated]
    before = {f: identity(f) for f in files if f != files[2]}
    console = recording()
    curve = losses(config(tmp_path, tiny_model_dir, "run-1"), console)
    out = console.file.getvalue()
    assert f"{truncated.file_name} (rows {truncated.start}..{truncated.stop - 1}): unreadable, truncated" in out, out
    assert f"{truncated.num_rows} of 40 rows left" in out, out
    assert {f: identity(f) for f in before} == before
    assert cache.check() == {}
    for role, values in cache.read().items():
        np.testing.assert_array_equal(values, expected[role])
    assert curve == pytest.approx(reference_curve, abs=1e-6)

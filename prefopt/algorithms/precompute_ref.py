"""`prefopt precompute-ref`: fill the reference log-prob cache once, reuse it across runs.

The cache for a run lives under `ref.cache_dir` (default: `refcache/` beside the run's
output_dir, so every run of a project shares it), in a directory named by the fingerprint
of (tokenized data, reference weights, tokenizer, max lengths, dtype). A changed input is a
new directory; a killed precompute resumes with the shards it has not written yet.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefopt.config import RunConfig


def cache_root(cfg: RunConfig) -> str:
    if cfg.ref.cache_dir is not None:
        return cfg.ref.cache_dir
    return str(Path(cfg.output_dir).expanduser().resolve().parent / "refcache")


def cache_parts(cfg: RunConfig, model_dir: Path, tokenizer, data) -> dict[str, str]:
    """What the cached values depend on, part by part (see prefopt.refcache)."""
    from prefopt.data.fingerprint import tokenizer_fingerprint
    from prefopt.refcache import fingerprint_parts

    return fingerprint_parts(data.fingerprint, model_dir, tokenizer_fingerprint(tokenizer), data.max_length,
                             data.max_prompt_length, cfg.model.dtype)


def open_cache(cfg: RunConfig, model_dir: Path, tokenizer, data, parts: dict[str, str] | None = None):
    from prefopt.algorithms.offline import ROLES
    from prefopt.refcache import RefCache

    parts = parts or cache_parts(cfg, model_dir, tokenizer, data)
    # Shards small enough that every replica gets several and a killed run loses little.
    shard_rows = max(cfg.train.micro_batch_size, min(4096, -(-data.num_rows // (4 * cfg.ref.num_replicas))))
    return RefCache.open(cache_root(cfg), parts, num_rows=data.num_rows, roles=list(ROLES[data.kind]),
                         shard_rows=shard_rows)


def precompute(cfg: RunConfig, model_dir: Path, tokenizer, data, console):
    """-> a complete RefCache for this run's inputs, computing only what is missing."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from prefopt.refcache import RefCache
    from prefopt.workers.reference import ReferenceServer

    parts = cache_parts(cfg, model_dir, tokenizer, data)
    nearest = RefCache.nearest(cache_root(cfg), parts)  # before open: open creates this cache
    cache = open_cache(cfg, model_dir, tokenizer, data, parts)
    missing = cache.missing_shards()
    if not missing:
        console.print(f"reference cache hit: {cache.uri}")
        return cache
    todo = sum(s.num_rows for s in missing)
    if todo == data.num_rows:
        why = f" (nearest cache {nearest[0]} differs in: {', '.join(nearest[1])})" if nearest and nearest[1] else ""
        console.print(f"reference cache miss{why}; computing {cache.uri}")
    else:
        console.print(f"resuming reference cache {cache.uri}: {todo} of {data.num_rows} rows left")
    columns = [TextColumn("[bold]reference log-probs"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]} examples/s"), TimeRemainingColumn()]
    with console.status(f"starting {cfg.ref.num_replicas} reference worker(s)"):
        server = ReferenceServer(cfg, model_dir, data)
    try:
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("ref", total=data.num_rows, completed=data.num_rows - todo, rate="-")
            start = time.perf_counter()

            def advance(rows: int) -> None:
                progress.advance(task, rows)
                done = progress.tasks[0].completed - (data.num_rows - todo)
                progress.update(task, rate=f"{done / max(time.perf_counter() - start, 1e-9):.0f}")

            server.fill(cache, on_shard=advance)
    finally:
        server.shutdown()
    return cache


def run(cfg: RunConfig, console) -> None:
    """The CLI command: prepare the data, then fill the cache."""
    from transformers import AutoTokenizer

    from prefopt.algorithms.offline import needs_reference_model
    from prefopt.cluster.ray_setup import connect
    from prefopt.data import prepare
    from prefopt.models import ensure_model

    if not needs_reference_model(cfg):
        console.print(f"algorithm {cfg.algorithm.name} needs no reference model: nothing to precompute")
        return
    output_dir = Path(cfg.output_dir)
    with console.status("model, tokenizer and data"):
        model_dir = ensure_model(cfg.model, output_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        data = prepare(cfg, tokenizer, output_dir / "data")
    connect(cfg.cluster, reference_replicas=cfg.ref.num_replicas)
    cache = precompute(cfg, model_dir, tokenizer, data, console)
    console.print(f"reference cache complete: {cache.uri} ({data.num_rows} rows, roles {', '.join(cache.roles)})")

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
from prefopt.storage import sibling

_SHOWN = 10  # shards failing verification reported one line each; the rest in one line


def cache_root(cfg: RunConfig) -> str:
    if cfg.ref.cache_dir is not None:
        return cfg.ref.cache_dir
    return sibling(cfg.output_dir, "refcache")  # beside output_dir: shared by every run of a project


def cache_parts(cfg: RunConfig, model_dir: Path, tokenizer, data) -> dict[str, str]:
    """What the cached values depend on, part by part (see prefopt.refcache)."""
    from prefopt.data.fingerprint import tokenizer_fingerprint
    from prefopt.refcache import fingerprint_parts

    return fingerprint_parts(data.fingerprint, model_dir, tokenizer_fingerprint(tokenizer), data.max_length,
                             data.max_prompt_length, cfg.model.dtype)


def open_cache(cfg: RunConfig, reference_dir: Path, tokenizer, data, parts: dict[str, str] | None = None):
    from prefopt.data import SEQUENCE_ROLES
    from prefopt.refcache import RefCache

    ref = cfg.reference
    parts = parts or cache_parts(cfg, reference_dir, tokenizer, data)
    # Each shard is split across the reference ranks; shards small enough that a killed run
    # loses little and the progress bar moves.
    shard_rows = max(ref.micro_batch_size * ref.num_workers, min(4096, -(-data.num_rows // 8)))
    return RefCache.open(cache_root(cfg), parts, num_rows=data.num_rows, roles=list(SEQUENCE_ROLES[data.kind]),
                         shard_rows=shard_rows)


def fill_reference_cache(cfg: RunConfig, inputs, console, start_reference, weights: str | None = None):
    """-> a complete, verified RefCache for this run's inputs, computing only what is missing:
    absent shards, and shards that fail verification (truncated, changed, without a checksum),
    each reported in one line.

    start_reference() gives the group that computes (holding the data), called only on a miss (or
    a partial cache). weights: what names the reference's weights when they are not those of
    inputs.reference_dir (a policy in training, as a round of prefopt.algorithms.rounds begins)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from prefopt.refcache import ABSENT, RefCache
    from prefopt.workers.reference import fill_cache

    data, reference_dir = inputs.data, inputs.reference_dir(cfg)
    parts = cache_parts(cfg, reference_dir, inputs.tokenizer, data)
    if weights is not None:
        parts["reference_weights"] = weights
    nearest = RefCache.nearest(cache_root(cfg), parts)  # before open: open creates this cache
    cache = open_cache(cfg, reference_dir, inputs.tokenizer, data, parts)
    problems = cache.check()
    missing = list(problems)
    bad = [(shard, why) for shard, why in problems.items() if why != ABSENT]
    for shard, why in bad[:_SHOWN]:
        console.print(f"reference cache {cache.uri}: {shard.file_name} (rows {shard.start}..{shard.stop - 1}): "
                      f"{why}; recomputing it", markup=False, highlight=False)
    if len(bad) > _SHOWN:  # a cache of the previous version: every shard, no need for every line
        console.print(f"reference cache {cache.uri}: {len(bad) - _SHOWN} more shards fail verification; "
                      "recomputing them", markup=False, highlight=False)
    if not missing:
        console.print(f"reference cache hit: {cache.uri}")
        return cache
    todo = sum(s.num_rows for s in missing)
    if todo == data.num_rows:
        why = f" (nearest cache {nearest[0]} differs in: {', '.join(nearest[1])})" if nearest and nearest[1] else ""
        console.print(f"reference cache miss{why}; computing {cache.uri}")
    else:
        console.print(f"resuming reference cache {cache.uri}: {todo} of {data.num_rows} rows left")
    group = start_reference()
    columns = [TextColumn("[bold]reference log-probs"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]} examples/s"), TimeRemainingColumn()]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("ref", total=data.num_rows, completed=data.num_rows - todo, rate="-")
        start = time.perf_counter()

        def advance(rows: int) -> None:
            progress.advance(task, rows)
            done = progress.tasks[0].completed - (data.num_rows - todo)
            progress.update(task, rate=f"{done / max(time.perf_counter() - start, 1e-9):.0f}")

        fill_cache(group, cache, missing, on_shard=advance)
    cache.verify()  # what was just written, read back: "complete" means every shard verifies
    return cache


def precompute(cfg: RunConfig, reference_dir: Path, tokenizer, data, console):
    """-> a complete RefCache of `data` under the reference at `reference_dir`, every shard
    verified, on a reference group of its own (started only when something is missing)."""
    from prefopt.algorithm_spec import REFERENCE
    from prefopt.algorithms import stages

    inputs = stages.Inputs(Path(reference_dir), tokenizer, data)
    stages.connect(cfg, roles=[REFERENCE])
    groups = []

    def start_reference():
        groups.append(stages.start_reference(cfg, inputs, console))
        return groups[0]

    try:
        return fill_reference_cache(cfg, inputs, console, start_reference)
    finally:
        for group in groups:
            group.shutdown()


def run(cfg: RunConfig, console) -> None:
    """The CLI command: prepare the data, then fill the cache."""
    from prefopt.algorithm_spec import REFERENCE
    from prefopt.algorithms import stages
    from prefopt.losses import needs_reference

    if not needs_reference(cfg.loss_name, **cfg.algorithm.loss_params()):
        console.print(f"algorithm {cfg.loss_name} needs no reference model: nothing to precompute")
        return
    stages.preflight(cfg, console, roles=[REFERENCE], tracking=False)
    inputs = stages.prepare_inputs(cfg, console)
    cache = precompute(cfg, inputs.reference_dir(cfg), inputs.tokenizer, inputs.data, console)
    console.print(f"reference cache complete: {cache.uri} ({inputs.data.num_rows} rows, roles "
                  f"{', '.join(cache.roles)})")

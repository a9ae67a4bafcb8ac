"""`prefopt label`: score generated completions with the reward role, write a preference data set.

Reads the shards of `prefopt generate` (all of them, each verified: an incomplete generation, or
a shard changed or cut short after it was written, is refused in one line naming it), scores
every completion shard by shard, and writes under `label.output_dir` (default
`<output_dir>/labelled`; a local path or any store's URI, s3:// included):

    scores/<scorer>/shard-NNNNN.parquet
                     the score cache, a `prefopt.shards` data set: one shard per generated shard
                     (same name and rows), written as soon as the shard is scored; <scorer> is the
                     first 16 hex digits of the scorer's fingerprint (scorer.json beside the shards
                     says which scorer it is). A score shard changed or cut short is scored again.
    pairs.jsonl      prompt, chosen, rejected: what `prefopt train --set data.path=...` reads
                     (label.pairs: best_worst, all_pairs or best_random), or
    scored.jsonl     prompt, completion, score: one row per completion (label.pairs: scored)
    scores.parquet   every completion with its score (prompt_index, sample, ...)
    manifest.json    the generator's manifest, a hash of the samples, the scorer, the pairs mode

The last four are written at the end, from all the shards. A killed run keeps its finished score
shards and the next one scores only the missing ones; another pairs mode or min_gap scores nothing.

The stages, for a controller that holds its groups already (ReST):
    scores = score_shards(scorer, generated, tables, cache, console)   # prefopt.algorithms.scoring
    data_file = write_labelled(cfg, out, generated, tables, scores, console)

The scorer is the reward role (`reward.source`, prefopt.algorithms.scoring). Completions that
would be bad training rows are never paired: empty (or whitespace-only) ones, and those whose
text holds the generator's EOS token text.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence

import pyarrow as pa

from prefopt import shards
from prefopt.algorithms.scoring import (
    RewardSettingsError,
    Scorer,
    check_reward,
    pairwise_scores,  # noqa: F401  (label's callers and tests know it from here)
    start_scorer,
)
from prefopt.algorithms.scoring import describe as scorer_description  # noqa: F401  (as pairwise_scores)
from prefopt.algorithms.scoring import fingerprint as scorer_fingerprint
from prefopt.config import RunConfig
from prefopt.errors import UserError
from prefopt.storage import Store

PAIR_MODES = ("best_worst", "all_pairs", "best_random")
SCORES_KIND = "prefopt.label.scores"  # the score shards' footer key
SCORES_SCHEMA = pa.schema([("key", pa.string()), ("prompt", pa.string()), ("completion", pa.string()),
                           ("score", pa.float64())])


class LabelError(UserError, ValueError):
    """Label cannot run on these inputs; the message says what to do."""


def output_dir(cfg: RunConfig) -> Store:
    return Store.at(cfg.label.output_dir) if cfg.label.output_dir else Store.at(cfg.output_dir) / "labelled"


def input_dir(cfg: RunConfig) -> Store:
    from prefopt.algorithms import generate

    return Store.at(cfg.label.input_dir) if cfg.label.input_dir else generate.output_dir(cfg)


# ----------------------------------------------------------------------------- pairs


def prompt_pairs(scores: Sequence[float], mode: str, *, min_gap: float = 0.0,
                 rng: random.Random | None = None) -> list[tuple[int, int]]:
    """The preference pairs of one prompt's completions, as (chosen, rejected) indices into scores.

    best_worst:  the highest against the lowest score (first one on ties);
    all_pairs:   every pair whose scores differ, the higher chosen (the DPO paper: 6 of 4 samples);
    best_random: the highest against one of the others drawn by rng (UltraFeedback's binarised set).
    A pair is kept only when its scores differ by more than min_gap: equal scores say nothing."""
    n = len(scores)
    if n < 2:
        return []
    if mode == "all_pairs":
        out = []
        for i in range(n):
            for j in range(i + 1, n):
                if abs(scores[i] - scores[j]) > min_gap:
                    out.append((i, j) if scores[i] > scores[j] else (j, i))
        return out
    best = max(range(n), key=lambda i: scores[i])
    if mode == "best_worst":
        other = min(range(n), key=lambda i: scores[i])
    elif mode == "best_random":
        if rng is None:
            raise ValueError("best_random needs an rng")
        other = rng.choice([i for i in range(n) if i != best])
    else:
        raise ValueError(f"label.pairs: unknown pairs mode {mode!r} (use {', '.join(PAIR_MODES)} or scored)")
    return [(best, other)] if scores[best] - scores[other] > min_gap else []


def usable(text: str, eos_token: str | None) -> bool:
    """Would this completion pass the data checks of `prefopt train` (no empty text, no EOS inside)?"""
    return bool(text.strip()) and not (eos_token and eos_token in text)


def build_rows(table: dict[str, list], scores: list[float], mode: str, *, min_gap: float, seed: int,
               eos_token: str | None) -> list[dict]:
    """The output rows from every completion (columns of the generated shards) and its score."""
    by_prompt: dict[int, list[int]] = {}
    for row, index in enumerate(table["prompt_index"]):
        if usable(table["completion"][row], eos_token):
            by_prompt.setdefault(index, []).append(row)
    out = []
    for index in sorted(by_prompt):
        rows = by_prompt[index]
        if mode == "scored":
            out += [{"prompt": table["prompt"][r], "completion": table["completion"][r], "score": scores[r]}
                    for r in rows]
            continue
        # Seeded per prompt: a prompt's pair does not depend on which other prompts are in the set.
        rng = random.Random(f"{seed}:{index}")
        for c, r in prompt_pairs([scores[r] for r in rows], mode, min_gap=min_gap, rng=rng):
            chosen, rejected = table["completion"][rows[c]], table["completion"][rows[r]]
            if chosen != rejected:  # identical texts are a bad training row
                out.append({"prompt": table["prompt"][rows[c]], "chosen": chosen, "rejected": rejected})
    return out


# ----------------------------------------------------------------------------- inputs


def read_generated(store: Store) -> tuple[shards.Dataset, list[dict[str, list]]]:
    """(the generated data set, the columns of each shard, in order), every shard verified;
    refuses an incomplete generation, and a shard changed or cut short, naming them."""
    from prefopt.algorithms.generate import samples_at

    try:
        manifest = shards.read_manifest(store)
    except shards.ManifestError as exc:
        raise LabelError(f"{exc}; run prefopt generate again into another directory") from None
    if manifest is None:
        raise LabelError(f"{store}: no generated samples ({shards.MANIFEST} missing); run prefopt generate first")
    if "shards" not in manifest:
        raise LabelError(f"{store}: written by an older prefopt (no shard plan in {shards.MANIFEST}); run "
                         "prefopt generate again into another directory")
    generated = samples_at(store, manifest)
    loaded = generated.load_all()
    missing = [s.file_name for s, (_, why) in loaded.items() if why == shards.ABSENT]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise LabelError(f"{store}: generation incomplete, {len(missing)} of {len(loaded)} shard(s) missing "
                         f"({shown}); run prefopt generate first")
    damaged = [(s.file_name, why) for s, (_, why) in loaded.items() if why is not None]
    if damaged:
        shown = "; ".join(f"{name}: {why}" for name, why in damaged[:3]) + (
            f"; and {len(damaged) - 3} more" if len(damaged) > 3 else "")
        raise LabelError(f"{store}: {len(damaged)} generated shard(s) damaged, never labelled ({shown}); run "
                         "prefopt generate again to sample them anew")
    return generated, [table.to_pydict() for table, _ in loaded.values()]


# ----------------------------------------------------------------------------- the score cache


def completion_key(prompt: str, completion: str) -> str:
    return hashlib.sha256(json.dumps([prompt, completion], ensure_ascii=False).encode()).hexdigest()


class ScoreCache:
    """One scorer's scores under `<label out>/scores/<fingerprint[:16]>/`: a `prefopt.shards` data
    set with a shard per generated shard (`plan`: theirs), of the same name and rows, with the
    columns key (completion_key), prompt, completion and score. A shard is reused only for a
    generated shard of exactly the same completions in the same order: a regenerated shard is a
    miss, never a silent reuse; a damaged one (check) is scored again."""

    def __init__(self, out: Store, scorer: dict, plan: list[shards.Shard]):
        fingerprint = scorer_fingerprint(scorer)
        self.directory = out / "scores" / fingerprint[:16]
        self.data = shards.Dataset(self.directory, SCORES_KIND, fingerprint, plan, SCORES_SCHEMA)
        described = self.directory / "scorer.json"
        if not described.is_file():  # which scorer this directory holds, for whoever looks
            described.write_text(json.dumps(scorer, indent=1, sort_keys=True))
        self.loaded = self.data.load_all()

    def get(self, shard: shards.Shard, keys: list[str]) -> list[float] | None:
        """The scores of a generated shard when its score shard verifies and holds exactly these
        completions; else None."""
        table, _ = self.loaded[shard]
        return table["score"].to_pylist() if table is not None and table["key"].to_pylist() == keys else None

    def damaged(self) -> dict[shards.Shard, str]:
        """Score shards present but failing verification, with why."""
        return {s: why for s, (_, why) in self.loaded.items() if why not in (None, shards.ABSENT)}

    def known(self) -> dict[str, float]:
        """key -> score over every verified shard of this scorer, whatever generated shard it was of."""
        out: dict[str, float] = {}
        for table, _ in self.loaded.values():
            if table is not None:
                out.update(zip(table["key"].to_pylist(), table["score"].to_pylist(), strict=True))
        return out

    def put(self, shard: shards.Shard, columns: dict[str, list], keys: list[str], scores: list[float]) -> None:
        table = pa.table({"key": keys, "prompt": columns["prompt"], "completion": columns["completion"],
                          "score": pa.array(scores, pa.float64())})
        self.data.write(shard, table)
        self.loaded[shard] = (table, None)


def score_shard(shard: dict[str, list], keys: list[str], score: Callable | None,
                known: dict[str, float] | None) -> tuple[list[float], int]:
    """(the scores of one generated shard's completions, how many were scored).

    known (key -> score): a score that is a function of prompt + completion alone is looked up
    there first, each other completion is scored once, and known is filled. None (a pairwise
    judge, whose score of a completion depends on the other completions of its prompt): the whole
    shard is scored."""
    if known is None:
        return score(shard), len(keys)
    todo: dict[str, int] = {}  # key -> its first row
    for row, key in enumerate(keys):
        if key not in known and key not in todo:
            todo[key] = row
    if todo:
        rows = list(todo.values())
        table = {c: [shard[c][r] for r in rows] for c in ("prompt", "prompt_index", "completion")}
        known.update(zip(todo, score(table), strict=True))
    return [known[key] for key in keys], len(todo)


# ----------------------------------------------------------------------------- the stages


def _progress(console, note: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]label"), BarColumn(), MofNCompleteColumn(), TextColumn("completions"),
                    TimeRemainingColumn(), TextColumn(note), console=console)


def in_chunks(scorer: Scorer, advance: Callable[[int], None]) -> Callable[[dict[str, list]], list[float]]:
    """score(columns) by `scorer`, a few calls of whole prompts (a pairwise judge compares the
    completions of one prompt) so that the bar moves; advance(completions) after each."""
    def score(table: dict[str, list]) -> list[float]:
        out: list[float] = []
        n, start = len(table["completion"]), 0
        while start < n:
            stop = min(start + scorer.chunk, n)
            while stop < n and table["prompt_index"][stop] == table["prompt_index"][stop - 1]:
                stop += 1
            part = slice(start, stop)
            out += scorer.score(table["prompt"][part], table["completion"][part], table["prompt_index"][part])
            advance(stop - start)
            start = stop
        return out

    return score


def score_shards(scorer: Scorer, generated: shards.Dataset, tables: list[dict[str, list]], cache: ScoreCache,
                 console) -> list[float]:
    """The stage: every completion's score, shard by shard (tables: the generated shards'
    columns). A shard in the cache is read, each other one scored and written to the cache at once
    (a killed run loses at most the shard it was scoring)."""
    keys = [[completion_key(p, c) for p, c in zip(t["prompt"], t["completion"], strict=True)] for t in tables]
    for shard, why in cache.damaged().items():
        console.print(f"label: score cache {cache.directory / shard.file_name}: {why}; scoring it again",
                      markup=False, highlight=False)
    scores = [cache.get(shard, k) for shard, k in zip(generated.shards, keys, strict=True)]
    missing = [i for i, s in enumerate(scores) if s is None]
    # A pairwise judge's score of a completion depends on its prompt's other completions, so no
    # lookup per completion (known None): it scores whole shards. That is exact: generate's shard i
    # holds all num_samples samples of each of its prompts, so a shard asks the judge the same
    # questions as the whole set does about its prompts.
    known = cache.known() if scorer.per_completion and missing else None
    scored = 0
    if missing:
        total = sum(map(len, keys))
        done = sum(len(k) for k, s in zip(keys, scores, strict=True) if s is not None)
        with _progress(console, f"{len(tables) - len(missing)} of {len(tables)} shard(s) reused") as progress:
            bar = progress.add_task("label", total=total, completed=done)
            score = in_chunks(scorer, lambda n: progress.advance(bar, n))
            for i in missing:
                scores[i], count = score_shard(tables[i], keys[i], score, known)
                progress.advance(bar, len(keys[i]) - count)  # found in the cache: done at once
                cache.put(generated.shards[i], tables[i], keys[i], scores[i])
                scored += count
    found = sum(len(keys[i]) for i in missing) - scored
    console.print(f"label: scored {len(missing)} of {len(tables)} shard(s), scores reused for "
                  f"{len(tables) - len(missing)} ({scored} completion(s) scored"
                  + (f", {found} repeats or found in the cache" if found else "") + f"); cache {cache.directory}")
    return [x for s in scores for x in s]


def samples_hash(table: dict[str, list]) -> str:
    """Hex sha256 of the scored texts: a regenerated set that differs is never matched to old scores."""
    h = hashlib.sha256()
    for row in zip(table["prompt_index"], table["sample"], table["prompt"], table["completion"], strict=True):
        h.update(json.dumps(row, ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


def write_labelled(cfg: RunConfig, out: Store, generated: shards.Dataset, tables: list[dict[str, list]],
                   scores: list[float], described: dict, console) -> str:
    """The stage after scoring: the pairs (or scored rows), scores.parquet and the manifest, written
    last, into `out`. -> the data file `prefopt train` reads (a local path or a store's URI)."""
    import pyarrow.parquet as pq

    lab = cfg.label
    table = {column: [x for t in tables for x in t[column]] for column in tables[0]}
    rows = build_rows(table, scores, lab.pairs, min_gap=lab.min_gap, seed=lab.seed,
                      eos_token=generated.manifest.get("eos_token"))
    # The manifest is written last and says what scores.parquet holds: none while it is rewritten.
    (out / "manifest.json").delete()
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({**table, "score": scores}), sink)
    (out / "scores.parquet").write_bytes(sink.getvalue().to_pybytes())
    data_file = out / ("scored.jsonl" if lab.pairs == "scored" else "pairs.jsonl")
    data_file.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    fingerprint = scorer_fingerprint(described)
    n = len(scores)
    manifest = {"generator": generated.manifest, "generated_dir": generated.store.uri,
                "samples": samples_hash(table), "scorer": described, "scorer_fingerprint": fingerprint,
                "scores_dir": f"scores/{fingerprint[:16]}", "pairs": lab.pairs, "min_gap": lab.min_gap,
                "seed": lab.seed, "file": data_file.name, "num_rows": len(rows), "mean_score": sum(scores) / max(n, 1)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    what = "scored completions" if lab.pairs == "scored" else f"{lab.pairs} pairs"
    console.print(f"wrote {len(rows)} {what} to [bold]{data_file}[/] (mean score {manifest['mean_score']:.4f})")
    if not rows:
        console.print("[yellow]warning:[/] no pairs: every prompt's scores were within label.min_gap of each other")
    return data_file.uri


# ----------------------------------------------------------------------------- the command


def check(cfg: RunConfig) -> None:
    """The reward settings, in seconds, before anything is read or written."""
    try:
        check_reward(cfg, for_ppo=False)
    except RewardSettingsError as exc:
        raise LabelError(str(exc)) from None


def score_with_judge(cfg: RunConfig, table: dict[str, list], console) -> list[float]:
    """`table`'s completions (columns prompt, prompt_index, completion) scored by cfg's judge, its
    ranks (if local) started for this call alone."""
    with start_scorer(cfg, console) as scorer:
        return scorer.score(table["prompt"], table["completion"], table["prompt_index"])


def run(cfg: RunConfig, console) -> str:
    """The CLI command -> the file `prefopt train` reads (pairs.jsonl, or scored.jsonl), a local
    path or a store's URI."""
    check(cfg)  # before reading anything: seconds, not minutes
    source = input_dir(cfg)
    generated, tables = read_generated(source)
    n = sum(len(t["completion"]) for t in tables)
    judge = cfg.reward.judge
    console.print(f"label: {n} completions of {generated.manifest['num_prompts']} prompts in {len(tables)} shard(s) "
                  f"from {source}, scored by the {cfg.reward.source}"
                  + (f" {cfg.data.task}" if cfg.reward.source == "task" else
                     f" {judge.model} at {judge.endpoint}" if cfg.reward.source == "judge" and judge.endpoint else
                     f" at {cfg.reward.model_path}"))
    out = output_dir(cfg)
    if not out.is_local:
        from prefopt.algorithms import stages

        stages.check_writable(out, "label.output_dir")
    # Lazy: the reward role's ranks start only if some completion is not in the cache.
    with start_scorer(cfg, console, lazy=True) as scorer:
        cache = ScoreCache(out, scorer.description, generated.shards)
        scores = score_shards(scorer, generated, tables, cache, console)
    return write_labelled(cfg, out, generated, tables, scores, scorer.description, console)

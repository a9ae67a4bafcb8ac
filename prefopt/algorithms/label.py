"""`prefopt label`: score generated completions with the reward role, write a preference data set.

Reads the shards of `prefopt generate` (all of them: an incomplete generation is refused), scores
every completion shard by shard, and writes under `label.output_dir` (default `<output_dir>/labelled`):

    scores/<scorer>/shard-NNNNN.parquet
                     the score cache: one file per generated shard (same name), written as soon as
                     the shard is scored; <scorer> is the first 16 hex digits of the scorer's
                     fingerprint (scorer.json beside the shards says which scorer it is)
    pairs.jsonl      prompt, chosen, rejected: what `prefopt train --set data.path=...` reads
                     (label.pairs: best_worst, all_pairs or best_random), or
    scored.jsonl     prompt, completion, score: one row per completion (label.pairs: scored)
    scores.parquet   every completion with its score (prompt_index, sample, ...)
    manifest.json    the generator's manifest, a hash of the samples, the scorer, the pairs mode

The last four are written at the end, from all the shards. A killed run keeps its finished score
shards and the next one scores only the missing ones; another pairs mode or min_gap scores nothing.

The scorer is the reward role (`reward.source`): `task` scores the text with the built-in task's
ground truth on the controller; `model` runs a reward model (a ...ForSequenceClassification
directory with one label, e.g. the export of algorithm reward_model) on the reward role's
ranks, each re-tokenizing prompt + completion with the reward model's own tokenizer, so a reward
model with another tokenizer than the generator's works.

Completions that would be bad training rows are never paired: empty (or whitespace-only) ones,
and those whose text holds the generator's EOS token text.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

from prefopt.config import RunConfig
from prefopt.errors import UserError

PAIR_MODES = ("best_worst", "all_pairs", "best_random")


class LabelError(UserError, ValueError):
    """Label cannot run on these inputs; the message says what to do."""


def output_dir(cfg: RunConfig) -> Path:
    from prefopt.storage import local_output

    return local_output(cfg.label.output_dir, cfg.output_dir, "labelled", "label.output_dir")


def input_dir(cfg: RunConfig) -> Path:
    from prefopt.algorithms import generate

    return Path(cfg.label.input_dir) if cfg.label.input_dir else generate.output_dir(cfg)


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


def read_generated(directory: Path) -> tuple[dict, list[dict[str, list]]]:
    """(generator manifest, the columns of each shard, in order); refuses an incomplete generation."""
    import pyarrow.parquet as pq

    from prefopt.algorithms.generate import MANIFEST, shard_name

    path = directory / MANIFEST
    if not path.is_file():
        raise LabelError(f"{directory}: no generated samples ({MANIFEST} missing); run prefopt generate first")
    manifest = json.loads(path.read_text())
    names = [shard_name(i) for i in range(manifest["num_shards"])]
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise LabelError(f"{directory}: generation incomplete, {len(missing)} of {len(names)} shard(s) missing "
                         f"({shown}); run prefopt generate first")
    return manifest, [pq.read_table(directory / n).to_pydict() for n in names]


def check_reward_model(model_path: str) -> dict:
    """The reward model's config.json; refuses a directory without a one-output scalar head."""
    from prefopt.storage import Store

    config_file = Store.at(model_path) / "config.json"
    if not config_file.is_file():
        raise LabelError(f"reward.model_path: {model_path} is not a Hugging Face model directory (no config.json)")
    config = json.loads(config_file.read_text())
    architectures = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise LabelError(f"reward.model_path: {model_path} holds no scalar head (architectures "
                         f"{', '.join(architectures) or 'none'}; a reward model is a ...ForSequenceClassification, "
                         "e.g. the export of algorithm reward_model)")
    labels = len(config.get("id2label") or {}) or config.get("num_labels", 1)
    if labels != 1:
        raise LabelError(f"reward.model_path: {model_path} has {labels} labels; a reward model has one")
    return config


# ----------------------------------------------------------------------------- progress


def _columns() -> list:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    return [TextColumn("[bold]label"), BarColumn(), MofNCompleteColumn(), TextColumn("completions"),
            TimeRemainingColumn()]


_run_bars: list[_RunBar] = []  # the bar of the label run in progress, if any: scoring calls move it


def _progress(console, total: int):
    """A progress bar for one scoring call of `total` units (completions, or a judge's questions),
    here and in judge_http. During a label run, a view of the run's one bar instead."""
    if _run_bars:
        return _run_bars[-1].view(total)
    from rich.progress import Progress

    return Progress(*_columns(), console=console)


class _RunBar:
    """One progress bar over a whole label run, in completions, with the reused shards done from the
    start. The scoring of a shard (`shard`) moves it across that shard's completions, in proportion
    to the scoring call's own units."""

    def __init__(self, console, total: int, done: int, note: str):
        from rich.progress import Progress, TextColumn

        self.progress = Progress(*_columns(), TextColumn(note), console=console)
        self.total, self.done, self.span = total, done, 0

    def __enter__(self) -> _RunBar:
        self.progress.__enter__()
        self.task = self.progress.add_task("label", total=self.total, completed=self.done)
        _run_bars.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _run_bars.remove(self)
        self.progress.__exit__(*exc)

    @contextmanager
    def shard(self, size: int) -> Iterator[None]:
        self.span = size
        yield
        self.done += size
        self.progress.update(self.task, completed=self.done)

    def view(self, units: int) -> _BarView:
        return _BarView(self, self.span / max(units, 1))


class _BarView:
    """What `_progress` gives a scoring call during a run: the Progress calls it makes, on the run's bar."""

    def __init__(self, run: _RunBar, scale: float):
        self.run, self.scale = run, scale

    def __enter__(self) -> _BarView:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, *args, **kwargs):
        return self.run.task

    def advance(self, task, units: float) -> None:
        self.run.progress.advance(task, units * self.scale)


# ----------------------------------------------------------------------------- scoring


def score_with_task(cfg: RunConfig, table: dict[str, list], console, chunk: int = 256) -> list[float]:
    from prefopt.tasks import get_task

    if cfg.data.task is None:
        raise LabelError("reward.source: task needs a built-in task (data.task); or use reward.source: model")
    task = get_task(cfg.data.task)
    n = len(table["completion"])
    scores: list[float] = []
    with _progress(console, n) as progress:
        bar = progress.add_task("label", total=n)
        for s in range(0, n, chunk):
            part = task.reward(table["prompt"][s : s + chunk], table["completion"][s : s + chunk])
            scores += part
            progress.advance(bar, len(part))
    return [float(x) for x in scores]


@contextmanager
def reward_role(cfg: RunConfig, console, head: str) -> Iterator:
    """The reward role's ranks (RewardWorker), started and holding reward.model_path with `head`;
    shut down at the end."""
    from prefopt.algorithms import stages

    stages.connect(cfg, with_reference=False)
    group = stages.start_reward(cfg, console, head)
    try:
        yield group
    finally:
        group.shutdown()


def on_reward_role(cfg: RunConfig, console, head: str, method: str, items: list, *args, group=None) -> list[float]:
    """`method(items, *args)` on the reward role's ranks, the items split across them in chunks, with
    a progress bar: one number per item. group: the started reward role (`reward_role(cfg, console,
    head)`); None starts one for this call alone."""
    if group is None:
        with reward_role(cfg, console, head) as started:
            return on_reward_role(cfg, console, head, method, items, *args, group=started)
    role = cfg.reward_role
    # A few calls rather than one, so the bar moves; each a multiple of every rank's scoring batch.
    chunk = role.score_batch * role.num_workers * 8
    out: list[float] = []
    with _progress(console, len(items)) as progress:
        bar = progress.add_task("label", total=len(items))
        for s in range(0, len(items), chunk):
            part = group.split(method, items[s : s + chunk], *args)
            out += part
            progress.advance(bar, len(part))
    return out


def score_with_model(cfg: RunConfig, table: dict[str, list], console, group=None) -> list[float]:
    items = [{"prompt": p, "completion": c} for p, c in zip(table["prompt"], table["completion"], strict=True)]
    return on_reward_role(cfg, console, "scalar", "score_texts", items, group=group)


def pairwise_scores(prompt_index: Sequence[int], p_first: dict[tuple[int, int], float]) -> list[float]:
    """Each completion's score from a pairwise judge: its mean probability of beating the other
    completions of its prompt. p_first[(i, j)]: the judge's p(the first shown wins) with i shown
    first. P(i beats j) = (p_first[i, j] + 1 - p_first[j, i]) / 2: both orders, averaged, so a
    judge that only prefers a position gives 0.5 (RLAIF, arXiv 2309.00267)."""
    by_prompt: dict[int, list[int]] = {}
    for row, prompt in enumerate(prompt_index):
        by_prompt.setdefault(prompt, []).append(row)
    scores = [0.5] * len(prompt_index)
    for rows in by_prompt.values():
        for i in rows:
            others = [j for j in rows if j != i]
            if others:
                scores[i] = sum((p_first[i, j] + 1 - p_first[j, i]) / 2 for j in others) / len(others)
    return scores


def score_with_judge(cfg: RunConfig, table: dict[str, list], console, group=None) -> list[float]:
    """An LLM judge on the reward role's ranks (group: started already; None: for this call alone)
    or behind judge.endpoint: rating (one question per completion) or pairwise (every ordered pair
    of a prompt's completions in `table`: both orders are asked)."""
    judge = cfg.reward.judge
    prompts, completions = table["prompt"], table["completion"]
    if judge.mode == "rating":
        keys = list(range(len(prompts)))
        questions = [judge.template.format(prompt=prompts[i], completion=completions[i]) for i in keys]
    else:
        keys = [(i, j) for i in range(len(prompts)) for j in range(len(prompts))
                if i != j and table["prompt_index"][i] == table["prompt_index"][j]]
        questions = [judge.template.format(prompt=prompts[i], a=completions[i], b=completions[j]) for i, j in keys]
    if judge.endpoint:
        from prefopt.algorithms import judge_http

        probs = judge_http.score(judge, questions, list(judge.answers), lambda total: _progress(console, total))
    else:
        probs = on_reward_role(cfg, console, "lm", "judge", questions, list(judge.answers), group=group)
    if judge.mode == "rating":
        return probs
    return pairwise_scores(table["prompt_index"], dict(zip(keys, probs, strict=True)))


@contextmanager
def scorer(cfg: RunConfig, console) -> Iterator[Callable[[dict[str, list]], list[float]]]:
    """score(columns) -> one score per completion, by the reward role. A reward model or a local
    judge starts the reward role's ranks once, for every call."""
    source = cfg.reward.source
    if source == "task":
        yield lambda table: score_with_task(cfg, table, console)
    elif source == "judge" and cfg.reward.judge.endpoint:
        yield lambda table: score_with_judge(cfg, table, console)
    else:
        score = score_with_model if source == "model" else score_with_judge
        with reward_role(cfg, console, "scalar" if source == "model" else "lm") as group:
            yield lambda table: score(cfg, table, console, group=group)


def scorer_description(cfg: RunConfig) -> dict:
    if cfg.reward.source == "task":
        return {"source": "task", "task": cfg.data.task}
    # What the judge is asked; how it is reached (timeouts, concurrency, the key) changes no score.
    asked = cfg.reward.judge.model_dump(mode="json", include={"mode", "template", "answers"})
    if cfg.reward.source == "judge" and cfg.reward.judge.endpoint:
        # The served weights cannot be fingerprinted from here: the endpoint and model name stand for them.
        return {"source": "judge", "endpoint": cfg.reward.judge.endpoint, "model": cfg.reward.judge.model,
                "judge": asked}
    from prefopt.refcache.fingerprint import weights_fingerprint

    described = {"source": cfg.reward.source, "model_path": str(Path(cfg.reward.model_path).resolve()),
                 "reward_weights": weights_fingerprint(cfg.reward.model_path)}
    if cfg.reward.source == "judge":
        described["judge"] = asked
    return described


def samples_hash(table: dict[str, list]) -> str:
    """Hex sha256 of the scored texts: a regenerated set that differs is never matched to old scores."""
    h = hashlib.sha256()
    for row in zip(table["prompt_index"], table["sample"], table["prompt"], table["completion"], strict=True):
        h.update(json.dumps(row, ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


# ----------------------------------------------------------------------------- the score cache


def scorer_fingerprint(scorer: dict) -> str:
    """Hex sha256 of the scorer's description (scorer_description) as canonical JSON."""
    canonical = json.dumps(scorer, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def completion_key(prompt: str, completion: str) -> str:
    return hashlib.sha256(json.dumps([prompt, completion], ensure_ascii=False).encode()).hexdigest()


class ScoreCache:
    """One scorer's scores under `<label out>/scores/<fingerprint[:16]>/`: a Parquet file per generated
    shard, of the same name, with the columns key (completion_key), prompt, completion and score, row
    for row of the generated shard. A file is reused only for a generated shard of exactly the same
    completions in the same order: a regenerated shard is a miss, never a silent reuse."""

    def __init__(self, out: Path, scorer: dict):
        self.directory = out / "scores" / scorer_fingerprint(scorer)[:16]
        self.directory.mkdir(parents=True, exist_ok=True)
        for tmp in self.directory.glob(".shard-*.tmp"):  # half-written by a killed run: never a shard
            tmp.unlink(missing_ok=True)
        described = self.directory / "scorer.json"
        if not described.is_file():  # which scorer this directory holds, for whoever looks
            _write_atomic(described, lambda p: p.write_text(json.dumps(scorer, indent=1, sort_keys=True)))

    @staticmethod
    def _read(path: Path) -> dict[str, list] | None:
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path, columns=["key", "score"]).to_pydict()
        except (OSError, ValueError, KeyError):  # absent or unreadable: score again
            return None

    def get(self, name: str, keys: list[str]) -> list[float] | None:
        """The scores of generated shard `name` when its file holds exactly these completions; else None."""
        cached = self._read(self.directory / name)
        return cached["score"] if cached is not None and cached["key"] == keys else None

    def known(self) -> dict[str, float]:
        """key -> score over every file of this scorer, whatever generated shard it was of."""
        out: dict[str, float] = {}
        for path in sorted(self.directory.glob("shard-*.parquet")):
            cached = self._read(path)
            if cached is not None:
                out.update(zip(cached["key"], cached["score"], strict=True))
        return out

    def put(self, name: str, shard: dict[str, list], keys: list[str], scores: list[float]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"key": keys, "prompt": shard["prompt"], "completion": shard["completion"],
                          "score": pa.array(scores, pa.float64())})
        _write_atomic(self.directory / name, lambda p: pq.write_table(table, p))


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


# ----------------------------------------------------------------------------- the command


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def score_all(cfg: RunConfig, console, out: Path, scorer_described: dict,
              shards: list[dict[str, list]]) -> list[float]:
    """Every completion's score, shard by shard: a shard already in the cache is read, each other one
    scored and written to the cache at once (a killed run loses at most the shard it was scoring)."""
    from prefopt.algorithms.generate import shard_name

    cache = ScoreCache(out, scorer_described)
    keys = [[completion_key(p, c) for p, c in zip(s["prompt"], s["completion"], strict=True)] for s in shards]
    scores = [cache.get(shard_name(i), k) for i, k in enumerate(keys)]
    missing = [i for i, s in enumerate(scores) if s is None]
    # A pairwise judge's score of a completion depends on its prompt's other completions, so no
    # lookup per completion (known None): it scores whole shards. That is exact: generate's shard i
    # holds prompts i*prompts_per_shard.. with all num_samples samples of each, so a shard asks the
    # judge the same questions as the whole set does about its prompts.
    pairwise = cfg.reward.source == "judge" and cfg.reward.judge.mode == "pairwise"
    known = None if pairwise or not missing else cache.known()
    # The reward role starts only if something is left to score.
    needed = any(known is None or any(k not in known for k in keys[i]) for i in missing)
    scored = 0
    if missing:
        done = sum(len(k) for k, s in zip(keys, scores, strict=True) if s is not None)
        bar = _RunBar(console, total=sum(map(len, keys)), done=done,
                      note=f"{len(shards) - len(missing)} of {len(shards)} shard(s) reused")
        with (scorer(cfg, console) if needed else nullcontext()) as score, bar:
            for i in missing:
                with bar.shard(len(keys[i])):
                    scores[i], count = score_shard(shards[i], keys[i], score, known)
                cache.put(shard_name(i), shards[i], keys[i], scores[i])
                scored += count
    found = sum(len(keys[i]) for i in missing) - scored
    console.print(f"label: scored {len(missing)} of {len(shards)} shard(s), scores reused for "
                  f"{len(shards) - len(missing)} ({scored} completion(s) scored"
                  + (f", {found} repeats or found in the cache" if found else "") + f"); cache {cache.directory}")
    return [x for s in scores for x in s]


def run(cfg: RunConfig, console) -> Path:
    """The CLI command -> the file `prefopt train` reads (pairs.jsonl, or scored.jsonl)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lab = cfg.label
    if cfg.reward.source == "model":
        check_reward_model(cfg.reward.model_path)  # before reading anything: seconds, not minutes
    judge = cfg.reward.judge
    if cfg.reward.source == "judge" and judge.endpoint:
        from prefopt.algorithms import judge_http

        judge_http.check_endpoint(judge)  # before reading anything: seconds, not minutes
    elif cfg.reward.source == "judge" and not (Path(cfg.reward.model_path) / "config.json").is_file():
        raise LabelError(f"reward.model_path: {cfg.reward.model_path} is not a Hugging Face model directory "
                         "(no config.json); the judge is a causal LM")
    elif cfg.reward.source == "task" and cfg.data.task is None:
        raise LabelError("reward.source: task needs a built-in task (data.task); or use reward.source: model")
    source_dir = input_dir(cfg)
    gen_manifest, shards = read_generated(source_dir)
    table = {column: [x for shard in shards for x in shard[column]] for column in shards[0]}
    n = len(table["completion"])
    console.print(f"label: {n} completions of {gen_manifest['num_prompts']} prompts in {len(shards)} shard(s) "
                  f"from {source_dir}, scored by the {cfg.reward.source}"
                  + (f" {cfg.data.task}" if cfg.reward.source == "task" else
                     f" {judge.model} at {judge.endpoint}" if cfg.reward.source == "judge" and judge.endpoint else
                     f" at {cfg.reward.model_path}"))
    described = scorer_description(cfg)
    out = output_dir(cfg)
    scores = score_all(cfg, console, out, described, shards)
    rows = build_rows(table, scores, lab.pairs, min_gap=lab.min_gap, seed=lab.seed,
                      eos_token=gen_manifest.get("eos_token"))

    # The manifest is written last and says what scores.parquet holds: none while it is rewritten.
    (out / "manifest.json").unlink(missing_ok=True)
    _write_atomic(out / "scores.parquet", lambda p: pq.write_table(pa.table({**table, "score": scores}), p))
    data_file = out / ("scored.jsonl" if lab.pairs == "scored" else "pairs.jsonl")

    def write_jsonl(path: Path) -> None:
        with path.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    _write_atomic(data_file, write_jsonl)
    fingerprint = scorer_fingerprint(described)
    manifest = {"generator": gen_manifest, "generated_dir": str(source_dir.resolve()), "samples": samples_hash(table),
                "scorer": described, "scorer_fingerprint": fingerprint, "scores_dir": f"scores/{fingerprint[:16]}",
                "pairs": lab.pairs, "min_gap": lab.min_gap, "seed": lab.seed, "file": data_file.name,
                "num_rows": len(rows), "mean_score": sum(scores) / max(n, 1)}
    _write_atomic(out / "manifest.json", lambda p: p.write_text(json.dumps(manifest, indent=1, sort_keys=True)))
    what = "scored completions" if lab.pairs == "scored" else f"{lab.pairs} pairs"
    console.print(f"wrote {len(rows)} {what} to [bold]{data_file}[/] (mean score {manifest['mean_score']:.4f})")
    if not rows:
        console.print("[yellow]warning:[/] no pairs: every prompt's scores were within label.min_gap of each other")
    return data_file

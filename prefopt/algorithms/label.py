"""`prefopt label`: score generated completions with the reward role, write a preference data set.

Reads the shards of `prefopt generate` (all of them: an incomplete generation is refused), scores
every completion, and writes under `label.output_dir` (default `<output_dir>/labelled`):

    pairs.jsonl      prompt, chosen, rejected: what `prefopt train --set data.path=...` reads
                     (label.pairs: best_worst, all_pairs or best_random), or
    scored.jsonl     prompt, completion, score: one row per completion (label.pairs: scored)
    scores.parquet   every completion with its score (prompt_index, sample, ...); reused by the next
                     label run into the same directory over the same samples and scorer
    manifest.json    the generator's manifest, a hash of the samples, the scorer, the pairs mode

The scorer is the reward role (`reward.source`): `task` scores the text with the built-in task's
ground truth on the controller; `model` runs a reward model (a ...ForSequenceClassification
directory with one label, e.g. the export of algorithm reward_model) on the reward role's
ranks, each re-tokenizing prompt + completion with the reward model's own tokenizer, so a reward
model with another tokenizer than the generator's works.

Completions that would be bad training rows are never paired: empty (or whitespace-only) ones,
and those whose text holds the generator's EOS token text.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

from prefopt.config import RunConfig
from prefopt.errors import UserError

PAIR_MODES = ("best_worst", "all_pairs", "best_random")


class LabelError(UserError, ValueError):
    """Label cannot run on these inputs; the message says what to do."""


def output_dir(cfg: RunConfig) -> Path:
    return Path(cfg.label.output_dir or Path(cfg.output_dir) / "labelled")


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


def read_generated(directory: Path) -> tuple[dict, dict[str, list]]:
    """(generator manifest, the columns of every shard in order); refuses an incomplete generation."""
    import pyarrow as pa
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
    table = pa.concat_tables([pq.read_table(directory / n) for n in names])
    return manifest, table.to_pydict()


def check_reward_model(model_path: str) -> dict:
    """The reward model's config.json; refuses a directory without a one-output scalar head."""
    config_file = Path(model_path) / "config.json"
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


# ----------------------------------------------------------------------------- scoring


def _progress(console, total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("[bold]label"), BarColumn(), MofNCompleteColumn(), TextColumn("completions"),
               TimeRemainingColumn()]
    return Progress(*columns, console=console)


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
            scores += task.reward(table["prompt"][s : s + chunk], table["completion"][s : s + chunk])
            progress.update(bar, completed=len(scores))
    return [float(x) for x in scores]


def on_reward_role(cfg: RunConfig, console, head: str, method: str, items: list, *args) -> list[float]:
    """`method(items, *args)` on the reward role's ranks (RewardWorker holding reward.model_path
    with `head`), the items split across them in chunks, with a progress bar: one number per item."""
    from prefopt.algorithms import stages
    from prefopt.cluster.worker_group import WorkerGroup
    from prefopt.workers.reward import RewardWorker

    role = cfg.reward_role
    stages.connect(cfg, with_reference=False)
    with console.status(f"starting {role.num_workers} reward worker(s)"):
        group = WorkerGroup(RewardWorker, role, cfg.cluster, name="reward", key="reward",
                            init_args=(cfg.model_dump_json(),))
    try:
        group.call("build", cfg.reward.model_path, train=False, head=head)
        # A few calls rather than one, so the bar moves; each a multiple of every rank's micro-batch.
        chunk = role.micro_batch_size * role.num_workers * 8
        out: list[float] = []
        with _progress(console, len(items)) as progress:
            bar = progress.add_task("label", total=len(items))
            for s in range(0, len(items), chunk):
                out += group.split(method, items[s : s + chunk], *args)
                progress.update(bar, completed=len(out))
        return out
    finally:
        group.shutdown()


def score_with_model(cfg: RunConfig, table: dict[str, list], console) -> list[float]:
    items = [{"prompt": p, "completion": c} for p, c in zip(table["prompt"], table["completion"], strict=True)]
    return on_reward_role(cfg, console, "scalar", "score_texts", items)


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


def score_with_judge(cfg: RunConfig, table: dict[str, list], console) -> list[float]:
    """An LLM judge on the reward role's ranks: rating (one question per completion) or pairwise
    (every ordered pair of a prompt's completions: both orders are asked)."""
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

        probs = judge_http.score(judge, questions, list(judge.answers), console)
    else:
        probs = on_reward_role(cfg, console, "lm", "judge", questions, list(judge.answers))
    if judge.mode == "rating":
        return probs
    return pairwise_scores(table["prompt_index"], dict(zip(keys, probs, strict=True)))


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
    import hashlib

    h = hashlib.sha256()
    for row in zip(table["prompt_index"], table["sample"], table["prompt"], table["completion"], strict=True):
        h.update(json.dumps(row, ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


def cached_scores(out: Path, samples: str, scorer: dict, n: int) -> list[float] | None:
    """The scores of an earlier label run into `out`, when they are of the same samples by the same
    scorer (another pairs mode or min_gap then costs no scoring); None otherwise."""
    import pyarrow.parquet as pq

    try:
        old = json.loads((out / "manifest.json").read_text())
        if old.get("samples") != samples or old.get("scorer") != scorer:
            return None
        scores = pq.read_table(out / "scores.parquet", columns=["score"])["score"].to_pylist()
    except (OSError, ValueError, KeyError):  # absent, or unreadable: score again
        return None
    return scores if len(scores) == n else None


# ----------------------------------------------------------------------------- the command


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


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
    source_dir = input_dir(cfg)
    gen_manifest, table = read_generated(source_dir)
    n = len(table["completion"])
    console.print(f"label: {n} completions of {gen_manifest['num_prompts']} prompts from {source_dir}, "
                  f"scored by the {cfg.reward.source}"
                  + (f" {cfg.data.task}" if cfg.reward.source == "task" else
                     f" {judge.model} at {judge.endpoint}" if cfg.reward.source == "judge" and judge.endpoint else
                     f" at {cfg.reward.model_path}"))
    scorer = scorer_description(cfg)
    out = output_dir(cfg)
    samples = samples_hash(table)
    scores = cached_scores(out, samples, scorer, n)
    if scores is not None:
        console.print(f"label: scores reused from {out / 'scores.parquet'} (same samples, same scorer)")
    elif cfg.reward.source == "task":
        scores = score_with_task(cfg, table, console)
    elif cfg.reward.source == "judge":
        scores = score_with_judge(cfg, table, console)
    else:
        scores = score_with_model(cfg, table, console)
    rows = build_rows(table, scores, lab.pairs, min_gap=lab.min_gap, seed=lab.seed,
                      eos_token=gen_manifest.get("eos_token"))

    out.mkdir(parents=True, exist_ok=True)
    # The manifest is written last and says what scores.parquet holds: none while it is rewritten.
    (out / "manifest.json").unlink(missing_ok=True)
    _write_atomic(out / "scores.parquet", lambda p: pq.write_table(pa.table({**table, "score": scores}), p))
    data_file = out / ("scored.jsonl" if lab.pairs == "scored" else "pairs.jsonl")

    def write_jsonl(path: Path) -> None:
        with path.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    _write_atomic(data_file, write_jsonl)
    manifest = {"generator": gen_manifest, "generated_dir": str(source_dir.resolve()), "samples": samples,
                "scorer": scorer, "pairs": lab.pairs, "min_gap": lab.min_gap, "seed": lab.seed, "file": data_file.name,
                "num_rows": len(rows), "mean_score": sum(scores) / max(n, 1)}
    _write_atomic(out / "manifest.json", lambda p: p.write_text(json.dumps(manifest, indent=1, sort_keys=True)))
    what = "scored completions" if lab.pairs == "scored" else f"{lab.pairs} pairs"
    console.print(f"wrote {len(rows)} {what} to [bold]{data_file}[/] (mean score {manifest['mean_score']:.4f})")
    if not rows:
        console.print("[yellow]warning:[/] no pairs: every prompt's scores were within label.min_gap of each other")
    return data_file

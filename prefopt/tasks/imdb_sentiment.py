"""Controlled sentiment generation on IMDb (the DPO paper's Fig. 2 task), built offline.

Prompts are the first 2-8 words of an IMDb review. The ground-truth reward of a completion is
its VADER sentiment (the lexicon ships in the PyPI package `vaderSentiment`), mapped from
VADER's compound score in [-1, 1] to [0, 1]: 1 is very positive, 0.5 neutral, 0 very negative.
The reward looks at the completion only, so it scores what the policy wrote.

Pairs stand in for the paper's "sample 4 completions from the SFT model and rank them": the
CANDIDATES for a prompt are the review's own next words and the words at the same offset in 5
other reviews (samples from the data distribution rather than from a model). The highest-scored
candidate is `chosen`, the lowest `rejected`; a prompt is kept only when their rewards differ by
at least MIN_GAP, so each pair says clearly which way the reward points. Measured with the tiny
model (DPO, beta 0.1, lr 5e-4, 4 pairs a step, 100 steps, fresh pairs each step): accuracy on
held-out test pairs 0.86-0.95 with MIN_GAP 0.7, about 0.8 with 0.5-0.6; on the pairs trained
on, 0.99-1.0. Completions are 6-16 words (about 30 tokens of the tiny tokenizer), cut after the
first sentence end past 6 words.

Views (`data.format`): preference (default), unpaired (chosen -> desirable, rejected ->
undesirable, two rows per pair) and prompt_only (PPO, ReST, evaluation). `data.split` is train
or test: a review is test when a hash of its words is 0 mod 10 (about 1 in 10), so no test
review, not even a repeated one, appears in training. `data.num_examples` sets the number of
rows (default DEFAULT_ROWS). Everything is a pure function of (split, seed, num_examples).
"""

from __future__ import annotations

import itertools
import random
import zlib
from collections.abc import Sequence
from functools import cache

from prefopt.config import DataConfig
from prefopt.tasks import Task, register
from prefopt.tasks.imdb import load_reviews

PROMPT_WORDS = (2, 8)
COMPLETION_WORDS = (6, 16)
CANDIDATES = 6
MIN_GAP = 0.7
DEFAULT_ROWS = 2000
TEST_EVERY = 10
_SENTENCE_END = (".", "!", "?")


@cache
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def reward(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """Sentiment of each completion in [0, 1] (VADER compound, (c + 1) / 2); prompts unused."""
    if len(prompts) != len(completions):
        raise ValueError(f"reward: {len(prompts)} prompts but {len(completions)} completions")
    analyzer = _analyzer()
    return [(analyzer.polarity_scores(c)["compound"] + 1.0) / 2.0 for c in completions]


@cache
def _split_words(split: str) -> tuple[tuple[str, ...], ...]:
    if split not in ("train", "test"):
        raise ValueError(f"data.split: the imdb_sentiment task has splits train and test, not {split!r}")
    # Split by a hash of the text, not by position: IMDb repeats some reviews, and a repeat
    # must land in the same split as its twin.
    words = [tuple(r.split()) for r in load_reviews(source="imdb")]
    test = split == "test"
    return tuple(w for w in words if (zlib.crc32(" ".join(w).encode()) % TEST_EVERY == 0) == test)


def _continuation(words: Sequence[str], start: int) -> str | None:
    """The 6-16 words after `start`, cut after a sentence end; None when the review is too short."""
    lo, hi = COMPLETION_WORDS
    if len(words) < start + lo:
        return None
    out = []
    for w in words[start : start + hi]:
        out.append(w)
        if len(out) >= lo and w.endswith(_SENTENCE_END):
            break
    # Leading space: prompt + completion reads as the original text, and a byte-level BPE
    # tokenizes the two halves exactly as it would the joined string.
    return " " + " ".join(out)


def _prompts(reviews, rng: random.Random):
    """Yield (review index, words in prompt, prompt text) in a seeded order."""
    order = list(range(len(reviews)))
    rng.shuffle(order)
    for i in order:
        k = rng.randint(*PROMPT_WORDS)
        if len(reviews[i]) >= k + COMPLETION_WORDS[0]:
            yield i, k, " ".join(reviews[i][:k])


def _pairs(reviews, rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i, k, prompt in _prompts(reviews, rng):
        others = rng.sample(range(len(reviews)), CANDIDATES - 1)
        candidates = [c for j in (i, *others) if (c := _continuation(reviews[j], k)) is not None]
        scores = reward([prompt] * len(candidates), candidates)
        best = max(range(len(candidates)), key=scores.__getitem__)
        worst = min(range(len(candidates)), key=scores.__getitem__)
        if scores[best] - scores[worst] >= MIN_GAP:
            rows.append({"prompt": prompt, "chosen": candidates[best], "rejected": candidates[worst]})
            if len(rows) == n:
                break
    return rows


@cache
def _rows(split: str, seed: int, n: int, fmt: str) -> tuple[dict, ...]:
    """Cached per process: scoring candidates takes seconds, and tests build the task often."""
    reviews = _split_words(split)
    # A string seed hashes the same in every process (unlike hash() of a str).
    rng = random.Random(f"imdb_sentiment/{split}/{seed}")
    if fmt == "prompt_only":
        return tuple({"prompt": p} for _, _, p in itertools.islice(_prompts(reviews, rng), n))
    if fmt == "preference":
        return tuple(_pairs(reviews, rng, n))
    rows = []  # unpaired: two rows per pair
    for pair in _pairs(reviews, rng, (n + 1) // 2):
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    return tuple(rows[:n])


def build(cfg: DataConfig, fmt: str) -> list[dict]:
    """Rows of the task in format `fmt` (preference, unpaired or prompt_only)."""
    if fmt not in TASK.formats:
        raise ValueError(
            f"data.format: the imdb_sentiment task has formats {', '.join(TASK.formats)}, not {fmt!r}"
        )
    rows = _rows(cfg.split, cfg.seed, cfg.num_examples or DEFAULT_ROWS, fmt)
    return [dict(r) for r in rows]  # copies: callers may change them, the cache must not


TASK = register(
    Task(
        name="imdb_sentiment",
        description="IMDb review prefixes; reward = VADER sentiment of the completion in [0, 1]",
        formats=("preference", "unpaired", "prompt_only"),
        build=build,
        reward=reward,
    )
)

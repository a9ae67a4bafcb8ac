"""Preference pairs from hand-made scores (prefopt.algorithms.label): which completions pair, which way."""

import random

import pytest

from prefopt.algorithms.label import build_rows, prompt_pairs, usable


def test_best_worst_pairs_highest_with_lowest():
    assert prompt_pairs([0.2, 0.9, 0.1, 0.5], "best_worst") == [(1, 2)]


def test_all_pairs_orders_every_pair_higher_first():
    pairs = prompt_pairs([0.2, 0.9, 0.1, 0.5], "all_pairs")
    assert len(pairs) == 6  # the DPO paper's 6 pairs of 4 samples
    assert set(pairs) == {(1, 0), (0, 2), (3, 0), (1, 2), (1, 3), (3, 2)}


def test_min_gap_drops_close_pairs_and_ties_never_pair():
    assert prompt_pairs([0.5, 0.5, 0.5, 0.5], "all_pairs") == []
    assert prompt_pairs([0.5, 0.5], "best_worst") == []
    assert set(prompt_pairs([0.2, 0.9, 0.1, 0.5], "all_pairs", min_gap=0.35)) == {(1, 0), (1, 2), (1, 3), (3, 2)}
    # the gap must be larger than min_gap, not equal to it
    assert prompt_pairs([1.0, 0.5], "best_worst", min_gap=0.5) == []


def test_best_random_pairs_the_best_with_a_seeded_other():
    scores = [0.2, 0.9, 0.1, 0.5]
    drawn = {prompt_pairs(scores, "best_random", rng=random.Random(seed))[0] for seed in range(50)}
    assert {chosen for chosen, _ in drawn} == {1}
    assert {rejected for _, rejected in drawn} == {0, 2, 3}  # never the best itself
    assert prompt_pairs(scores, "best_random", rng=random.Random(7)) == prompt_pairs(
        scores, "best_random", rng=random.Random(7))


def test_fewer_than_two_completions_give_no_pair():
    for mode in ("best_worst", "all_pairs"):
        assert prompt_pairs([0.3], mode) == [] and prompt_pairs([], mode) == []


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown pairs mode"):
        prompt_pairs([0.1, 0.2], "worst_best")


def table():
    # two prompts, 3 samples each; prompt 1 has an empty completion and one holding the EOS text
    return {
        "prompt": ["A"] * 3 + ["B"] * 3,
        "prompt_index": [0, 0, 0, 1, 1, 1],
        "completion": [" good", " bad", " meh", " fine", "  ", " x</s>y"],
    }


def test_build_rows_pairs_per_prompt_and_skips_unusable_completions():
    rows = build_rows(table(), [0.9, 0.1, 0.5, 0.7, 1.0, 0.0], "best_worst", min_gap=0.0, seed=0, eos_token="</s>")
    assert rows == [{"prompt": "A", "chosen": " good", "rejected": " bad"}]  # prompt B has one usable completion
    rows = build_rows(table(), [0.9, 0.1, 0.5, 0.7, 1.0, 0.0], "all_pairs", min_gap=0.0, seed=0, eos_token="</s>")
    assert len(rows) == 3 and {r["prompt"] for r in rows} == {"A"}


def test_build_rows_identical_texts_never_pair():
    t = {"prompt": ["A"] * 3, "prompt_index": [0, 0, 0], "completion": [" same", " same", " other"]}
    rows = build_rows(t, [0.9, 0.9, 0.1], "all_pairs", min_gap=0.0, seed=0, eos_token=None)
    assert rows == [{"prompt": "A", "chosen": " same", "rejected": " other"}] * 2


def test_build_rows_scored_keeps_every_usable_completion_with_its_score():
    rows = build_rows(table(), [0.9, 0.1, 0.5, 0.7, 1.0, 0.0], "scored", min_gap=0.0, seed=0, eos_token="</s>")
    assert [(r["prompt"], r["completion"], r["score"]) for r in rows] == [
        ("A", " good", 0.9), ("A", " bad", 0.1), ("A", " meh", 0.5), ("B", " fine", 0.7)]


def test_usable():
    assert usable(" ok", "</s>") and not usable(" \n", "</s>") and not usable("a</s>", "</s>") and usable("a", None)

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


def test_a_pairwise_judge_is_asked_both_orders_and_a_position_preference_cancels():
    from prefopt.algorithms.label import pairwise_scores

    # Two prompts: completions 0, 1, 2 of prompt 7 and 3, 4 of prompt 9.
    prompt_index = [7, 7, 7, 9, 9]
    pairs = [(i, j) for i in range(5) for j in range(5) if i != j and prompt_index[i] == prompt_index[j]]
    # A judge that always says "the first shown wins" with 0.9, whatever it is shown: all 0.5.
    assert pairwise_scores(prompt_index, dict.fromkeys(pairs, 0.9)) == pytest.approx([0.5] * 5)
    # A judge that prefers completion 0 in both orders (0.8 shown first, 0.3 shown second), and is
    # indifferent otherwise: P(0 beats j) = (0.8 + 1 - 0.3) / 2 = 0.75.
    p = dict.fromkeys(pairs, 0.5)
    for j in (1, 2):
        p[0, j], p[j, 0] = 0.8, 0.3
    scores = pairwise_scores(prompt_index, p)
    assert scores[0] == pytest.approx(0.75)
    assert scores[1] == pytest.approx((0.25 + 0.5) / 2)  # loses to 0, ties with 2
    assert scores[3] == scores[4] == pytest.approx(0.5)


@pytest.mark.parametrize(("mode", "template", "says"), [
    ("rating", "Is {prompt} good?", "missing: {completion}"),
    ("pairwise", "{prompt}: {a} or {completion}?", "missing: {b}"),
])
def test_a_judge_template_without_its_placeholders_is_refused(mode, template, says):
    from prefopt.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"reward\.judge: template: .*" + says.replace("{", r"\{").replace("}", r"\}")):
        load_config(None, [f"reward.judge.mode={mode}", f"reward.judge.template={template}"])


def test_score_shard_looks_up_known_scores_and_scores_each_other_completion_once():
    from prefopt.algorithms.label import completion_key, score_shard

    shard = {"prompt": ["A"] * 4 + ["B"] * 2, "prompt_index": [0] * 4 + [1] * 2,
             "completion": [" x", " y", " x", " z", " x", " y"]}
    keys = [completion_key(p, c) for p, c in zip(shard["prompt"], shard["completion"], strict=True)]
    asked = []

    def length(table):  # a scorer whose score is a function of prompt + completion alone
        asked.append(list(zip(table["prompt"], table["completion"], strict=True)))
        return [float(len(p + c)) for p, c in zip(table["prompt"], table["completion"], strict=True)]

    known = {completion_key("A", " y"): 9.0}  # an earlier score: found, not asked again
    scores, count = score_shard(shard, keys, length, known)
    assert asked == [[("A", " x"), ("A", " z"), ("B", " x"), ("B", " y")]] and count == 4
    assert scores == [3.0, 9.0, 3.0, 3.0, 3.0, 3.0]
    assert score_shard(shard, keys, None, known) == (scores, 0)  # all known now: no scorer needed
    # A pairwise judge's score depends on the other completions of the prompt: the whole shard is asked.
    asked.clear()
    assert score_shard(shard, keys, length, None) == ([3.0] * 6, 6) and asked == [list(zip(
        shard["prompt"], shard["completion"], strict=True))]


def test_score_cache_reuses_a_shard_only_for_the_same_completions(tmp_path):
    from prefopt.algorithms.label import ScoreCache, completion_key, scorer_fingerprint
    from prefopt.shards import Shard
    from prefopt.storage import Store

    task = {"source": "task", "task": "imdb_sentiment"}
    plan = [Shard(0, 0, 2, digits=5), Shard(1, 2, 4, digits=5)]  # the generated shards': two of 2 rows
    cache = ScoreCache(Store.at(tmp_path), task, plan)
    assert cache.directory.uri == str(tmp_path / "scores" / scorer_fingerprint(task)[:16])
    shard = {"prompt": ["A", "A"], "completion": [" x", " y"]}
    keys = [completion_key("A", " x"), completion_key("A", " y")]
    assert cache.get(plan[0], keys) is None
    cache.put(plan[0], shard, keys, [0.25, 0.5])
    assert ScoreCache(Store.at(tmp_path), task, plan).get(plan[0], keys) == [0.25, 0.5]
    assert cache.get(plan[0], keys[::-1]) is None  # other completions (or order): a miss
    assert cache.get(plan[0], [completion_key("A", " x"), completion_key("A", " w")]) is None
    assert cache.known() == dict(zip(keys, [0.25, 0.5], strict=True))
    (tmp_path / "scores" / cache.directory.name / "shard-00001.parquet").write_bytes(b"PAR1 cut short")
    again = ScoreCache(Store.at(tmp_path), task, plan)  # unreadable: a miss, said as damaged
    assert again.get(plan[1], keys) is None and len(again.known()) == 2
    assert list(again.damaged()) == [plan[1]] and again.damaged()[plan[1]].startswith("unreadable, truncated")
    # Another scorer: another directory, the first one's scores untouched.
    other = ScoreCache(Store.at(tmp_path), {**task, "task": "other"}, plan)
    assert other.directory != cache.directory and other.get(plan[0], keys) is None
    assert scorer_fingerprint({"b": 1, "a": [1, 2]}) == scorer_fingerprint({"a": [1, 2], "b": 1})  # canonical

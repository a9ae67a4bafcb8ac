"""Standard errors over prompts, and the evaluation's fingerprint, against values worked by hand."""

import math

import pytest

from prefopt.eval import fingerprint
from prefopt.eval.stats import mean_and_se, per_prompt_means


def test_standard_error_by_hand():
    # values 1, 2, 6: mean 3; deviations -2, -1, 3; sample variance (4 + 1 + 9) / 2 = 7
    mean, se = mean_and_se([1.0, 2.0, 6.0])
    assert mean == pytest.approx(3.0)
    assert se == pytest.approx(math.sqrt(7 / 3))
    assert mean_and_se([0.4]) == (0.4, 0.0)
    with pytest.raises(ValueError):
        mean_and_se([])


def test_samples_of_a_prompt_are_averaged_before_the_error():
    # 2 prompts x 2 samples: per-prompt means 1.5 and 4.0 -> mean 2.75, SE |4 - 1.5| / 2 = 1.25
    per_prompt = per_prompt_means([1.0, 2.0, 3.0, 5.0], 2)
    assert per_prompt == [1.5, 4.0]
    assert mean_and_se(per_prompt) == pytest.approx((2.75, 1.25))
    with pytest.raises(ValueError, match="not a whole number of prompts"):
        per_prompt_means([1.0, 2.0, 3.0], 2)


def test_the_fingerprint_changes_with_what_makes_evaluations_comparable():
    sampling = {"max_new_tokens": 24, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "greedy": False, "seed": 0}
    base = fingerprint("imdb_sentiment", ["a", "b"], sampling, 2)
    assert base == fingerprint("imdb_sentiment", ["a", "b"], dict(sampling), 2)
    assert base != fingerprint("imdb_sentiment", ["a", "c"], sampling, 2)
    assert base != fingerprint("imdb_sentiment", ["a", "b"], sampling | {"max_new_tokens": 32}, 2)
    assert base != fingerprint("imdb_sentiment", ["a", "b"], sampling | {"seed": 1}, 2)
    assert base != fingerprint("imdb_sentiment", ["a", "b"], sampling, 1)
    assert base != fingerprint("other_task", ["a", "b"], sampling, 2)


def test_a_sweeps_seeds_are_evaluated_on_the_same_prompts(tiny_tokenizer):
    """data.seed (a trial's seed) changes the training data's order, never the held-out prompts."""
    from prefopt.config import load_config
    from prefopt.eval import eval_prompts

    seeds = [load_config(None, ["data.task=imdb_sentiment", f"data.seed={s}", "eval.num_prompts=8"]) for s in (0, 3)]
    first, second = (eval_prompts(cfg, tiny_tokenizer) for cfg in seeds)
    assert first == second and len(first[0]) == 8

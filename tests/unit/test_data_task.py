"""The built-in imdb_sentiment task: deterministic pairs, a sensible reward, every view."""

import pytest

from prefopt.config import DataConfig, RunConfig
from prefopt.data import DataError, check, prepare
from prefopt.tasks import get_task
from prefopt.tasks import imdb_sentiment as imdb

N = 60


@pytest.fixture(scope="module")
def task():
    return get_task("imdb_sentiment")


def test_reward_is_sentiment_in_unit_interval(task):
    texts = [" a wonderful, moving and beautiful film.", " the worst, most boring mess I have seen.",
             " the film is ninety minutes long."]
    good, bad, neutral = task.reward(["The movie was"] * 3, texts)
    assert good > 0.8 and bad < 0.2 and neutral == 0.5
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        task.reward(["a", "b"], ["c"])


def test_pairs_are_deterministic_short_and_clearly_ranked(task, tiny_tokenizer):
    rows = task.build(DataConfig(num_examples=N), "preference")
    assert rows == task.build(DataConfig(num_examples=N), "preference")
    assert rows != task.build(DataConfig(num_examples=N, seed=1), "preference")
    assert rows[:10] == task.build(DataConfig(num_examples=10), "preference")
    assert len(rows) == N and set(rows[0]) == {"prompt", "chosen", "rejected"}
    for r in rows:
        assert 2 <= len(r["prompt"].split()) <= 8
        assert r["chosen"].startswith(" ") and 6 <= len(r["chosen"].split()) <= 16
    prompts = [r["prompt"] for r in rows]
    chosen = task.reward(prompts, [r["chosen"] for r in rows])
    rejected = task.reward(prompts, [r["rejected"] for r in rows])
    assert all(c - r >= imdb.MIN_GAP for c, r in zip(chosen, rejected, strict=True))
    lengths = [len(tiny_tokenizer(r["chosen"], add_special_tokens=False)["input_ids"]) for r in rows]
    assert sum(lengths) / len(lengths) < 40  # "a few dozen tokens"


def test_views_and_splits(task):
    unpaired = task.build(DataConfig(num_examples=N), "unpaired")
    pairs = task.build(DataConfig(num_examples=N // 2), "preference")
    assert [r["label"] for r in unpaired[:4]] == [True, False, True, False]
    assert unpaired[1] == {"prompt": pairs[0]["prompt"], "completion": pairs[0]["rejected"], "label": False}
    prompts = task.build(DataConfig(num_examples=N), "prompt_only")
    assert len(prompts) == N and set(prompts[0]) == {"prompt"}
    train, test = imdb._split_words("train"), imdb._split_words("test")
    assert 2200 < len(test) < 2800 and len(train) + len(test) == 25000
    assert not set(train) & set(test)  # IMDb repeats some reviews: never across splits
    with pytest.raises(ValueError, match="has splits train and test, not 'validation'"):
        task.build(DataConfig(split="validation"), "prompt_only")


def test_embedded_default_prepares(tmp_path, tiny_tokenizer):
    cfg = RunConfig.model_validate({"data": {"num_examples": N}})
    assert cfg.data.task == "imdb_sentiment" and cfg.data.path is None
    td = prepare(cfg, tiny_tokenizer, tmp_path)
    assert (td.format, td.num_rows) == ("preference", N)
    assert td.report.source == "task imdb_sentiment (split train)"
    prompts = check(RunConfig.model_validate({"data": {"num_examples": 5, "format": "prompt_only", "split": "test"}}),
                    tiny_tokenizer)
    assert prompts.spec.name == "prompt_only" and prompts.table.num_rows == 5


def test_unknown_task_or_view(tiny_tokenizer):
    with pytest.raises(DataError, match=r"unknown task 'imdb' \(built-in tasks: imdb_sentiment\)"):
        check(RunConfig.model_validate({"data": {"task": "imdb"}}), tiny_tokenizer)
    with pytest.raises(DataError, match="provides preference, unpaired, prompt_only, not 'conversational'"):
        check(RunConfig.model_validate({"data": {"format": "conversational"}}), tiny_tokenizer)

"""ReST and iterative DPO without a cluster (prefopt.algorithms.rounds): the phase schedule, the
prompts of each Grow, the threshold and the rows each phase trains on, the data's own rows for
mix_original, and the config checks of the rest and iterative sections (prefopt.config)."""

import json
import math

import numpy as np
import pytest

from prefopt.algorithms.generate import Prompts
from prefopt.algorithms.rounds import (
    Phase,
    RoundError,
    grow_prompts,
    iterative_rows,
    keep_threshold,
    original_rows,
    rest_rows,
    schedule,
)
from prefopt.config import ConfigError, build_config


def rest(**section):
    extra = section.pop("tree", {})
    return build_config({"algorithm": {"name": "rest"}, "rest": section, **extra}, source="test")


def iterative(**section):
    extra = section.pop("tree", {})
    return build_config({"algorithm": {"name": "iterative_dpo"}, "iterative": section, **extra}, source="test")


def refused(tree: dict) -> str:
    with pytest.raises(ConfigError) as info:
        build_config(tree, source="test")
    return str(info.value)


def grown_set(prompt_index, completions, scores):
    return {
        "prompt": [f"prompt {i}" for i in prompt_index],
        "prompt_index": list(prompt_index),
        "sample": list(range(len(scores))),
        "completion": list(completions),
        "score": list(scores),
    }


# ----------------------------------------------------------------------------- schedule


def test_rest_schedule_has_an_improve_step_per_threshold_after_each_grow():
    cfg = rest(grow_steps=2, thresholds=[0.2, 0.5, 0.8], improve_steps=5)
    phases = schedule(cfg)
    assert len(phases) == 6
    assert [(p.first, p.end) for p in phases] == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 25), (25, 30)]
    assert [p.index for p in phases] == list(range(6))
    assert [p.grow for p in phases] == [0, 0, 0, 1, 1, 1]
    assert [p.improve for p in phases] == [0, 1, 2, 0, 1, 2]
    assert [p.threshold for p in phases] == [0.2, 0.5, 0.8, 0.2, 0.5, 0.8]


def test_iterative_schedule_is_one_round_per_grow():
    phases = schedule(iterative(rounds=3, round_steps=4))
    assert [(p.first, p.end) for p in phases] == [(0, 4), (4, 8), (8, 12)]
    assert [p.grow for p in phases] == [p.index for p in phases] == [0, 1, 2]
    assert all(p.threshold is None and p.improve == 0 for p in phases)


@pytest.mark.parametrize("cfg", [
    rest(grow_steps=2, thresholds=[0.2, 0.5, 0.8], improve_steps=5),
    rest(grow_steps=3, thresholds=[0.9], improve_steps=7),
    iterative(rounds=3, round_steps=4),
    iterative(rounds=1, round_steps=9),
], ids=["rest-2x3x5", "rest-3x1x7", "iterative-3x4", "iterative-1x9"])
def test_max_steps_is_the_schedules_total(cfg):
    phases = schedule(cfg)
    assert cfg.train.max_steps == cfg.schedule_steps == phases[-1].end
    assert phases[0].first == 0
    assert all(a.end == b.first for a, b in zip(phases, phases[1:], strict=False))  # no gap, no overlap


def test_phase_names():
    assert Phase(4, 1, 20, 25, threshold=0.5, improve=1).name == "grow 2, improve 2"
    assert Phase(2, 2, 8, 12).name == "round 3"
    # A threshold of 0 is still a ReST phase: the name must not test the threshold's truth.
    assert Phase(0, 0, 0, 5, threshold=0.0, improve=0).name == "grow 1, improve 1"


# ----------------------------------------------------------------------------- config


def test_loss_name_is_the_sections_loss():
    assert rest(loss="dpo").loss_name == "dpo"
    assert rest().loss_name == "sft"
    assert iterative(loss="ipo").loss_name == "ipo"
    assert build_config({"algorithm": {"name": "simpo"}}, source="test").loss_name == "simpo"


def test_iterative_refuses_sft_and_names_the_allowed_losses():
    message = refused({"algorithm": {"name": "iterative_dpo"}, "iterative": {"loss": "sft"}})
    assert "iterative.loss: sft;" in message
    allowed = message.split("use one of ", 1)[1].split(", ")
    assert "dpo" in allowed and "simpo" in allowed and "sft" not in allowed


def test_rest_refuses_an_unpaired_loss_and_names_the_allowed_ones():
    message = refused({"algorithm": {"name": "rest"}, "rest": {"loss": "kto"}})
    assert "rest.loss: kto;" in message
    assert "not a loss" not in message  # kto is a loss, just not one ReST can train
    allowed = message.split("use one of ", 1)[1].split(", ")
    assert "sft" in allowed and "dpo" in allowed and "kto" not in allowed


def test_rest_refuses_an_unknown_loss_saying_so():
    assert "rest.loss: bogus (not a loss)" in refused({"algorithm": {"name": "rest"}, "rest": {"loss": "bogus"}})


@pytest.mark.parametrize("thresholds", [[0.5, 0.5], [0.7, 0.5], [0.1, 0.6, 0.4]])
def test_thresholds_must_rise(thresholds):
    assert "must rise" in refused({"algorithm": {"name": "rest"}, "rest": {"thresholds": thresholds}})


@pytest.mark.parametrize("thresholds", [[0.5, 1.0], [-0.1, 0.5], [1.5]])
def test_thresholds_must_lie_in_zero_to_one(thresholds):
    assert "must lie in [0, 1)" in refused({"algorithm": {"name": "rest"}, "rest": {"thresholds": thresholds}})


def test_thresholds_may_start_at_zero():
    assert rest(thresholds=[0.0, 0.99]).rest.thresholds == [0.0, 0.99]


def test_no_thresholds_refused():
    assert "rest.thresholds" in refused({"algorithm": {"name": "rest"}, "rest": {"thresholds": []}})


def test_explicit_max_steps_other_than_the_schedule_refused():
    message = refused({"algorithm": {"name": "rest"}, "rest": {"grow_steps": 2, "improve_steps": 5},
                       "train": {"max_steps": 100}})
    assert "train.max_steps: 100" in message and "= 30 steps" in message
    assert "leave train.max_steps unset" in message
    message = refused({"algorithm": {"name": "iterative_dpo"}, "iterative": {"rounds": 3, "round_steps": 4},
                       "train": {"max_steps": 13}})
    assert "iterative.rounds x iterative.round_steps = 12 steps" in message
    assert "leave train.max_steps unset" in message


def test_explicit_max_steps_equal_to_the_schedule_accepted():
    assert iterative(rounds=3, round_steps=4, tree={"train": {"max_steps": 12}}).train.max_steps == 12


def test_a_written_config_loads_again():
    # The run's config.yaml holds the max_steps the schedule set: reading it back must not refuse it.
    cfg = rest(grow_steps=2, improve_steps=5)
    again = build_config(cfg.model_dump(mode="json"), source="test")
    assert again.train.max_steps == 30 and schedule(again) == schedule(cfg)


def test_a_round_config_leaves_the_default_max_steps_of_other_runs_alone():
    rest(grow_steps=2, improve_steps=5)
    iterative(rounds=3, round_steps=4)
    assert build_config({}, source="test").train.max_steps == 100


def test_live_reference_refused():
    for tree in ({"algorithm": {"name": "rest"}, "rest": {"loss": "dpo"}, "ref": {"mode": "live"}},
                 {"algorithm": {"name": "iterative_dpo"}, "ref": {"mode": "live"}}):
        assert "ref.mode: live" in refused(tree) and "use ref.mode: cache" in refused(tree)


def test_beta_refused_for_sft_and_accepted_for_dpo():
    message = refused({"algorithm": {"name": "rest", "beta": 0.2}})  # rest.loss defaults to sft
    assert "'sft'" in message and "'beta'" in message
    cfg = rest(loss="dpo", tree={"algorithm": {"name": "rest", "beta": 0.2}})
    assert cfg.algorithm.loss_params() == {"beta": 0.2}


def test_beta_out_of_range_for_the_rounds_loss_refused():
    assert "beta" in refused({"algorithm": {"name": "iterative_dpo", "beta": -1.0}})


def test_no_reference_refused_only_for_a_loss_that_reads_one():
    assert "needs a reference model" in refused(
        {"algorithm": {"name": "rest"}, "rest": {"loss": "dpo"}, "ref": {"mode": "none"}})
    assert rest(loss="sft", tree={"ref": {"mode": "none"}}).ref.mode == "none"
    assert iterative(loss="simpo", tree={"ref": {"mode": "none"}}).ref.mode == "none"


# ----------------------------------------------------------------------------- grow_prompts


def five_prompts():
    return Prompts([f"p{i}" for i in range(5)], [[i, i + 1] for i in range(5)], "fp")


def test_all_prompts_when_num_prompts_is_none_or_covers_them():
    prompts = five_prompts()
    for num in (None, 5, 9):
        for g in (0, 3):
            assert grow_prompts(prompts, num, g) is prompts


def test_num_prompts_taken_in_turn_wrapping_around():
    prompts = five_prompts()
    first, second, third = (grow_prompts(prompts, 3, g) for g in range(3))
    assert first.texts == ["p0", "p1", "p2"] and first.ids == [[0, 1], [1, 2], [2, 3]]
    assert second.texts == ["p3", "p4", "p0"] and second.ids == [[3, 4], [4, 5], [0, 1]]
    assert third.texts == ["p1", "p2", "p3"]
    assert len({prompts.fingerprint, first.fingerprint, second.fingerprint, third.fingerprint}) == 4
    assert grow_prompts(prompts, 3, 1).fingerprint == second.fingerprint  # the same Grow: the same samples
    assert grow_prompts(prompts, 2, 1).fingerprint != second.fingerprint


# ----------------------------------------------------------------------------- keep_threshold


def test_quantile_threshold():
    scores = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    assert keep_threshold(scores, 0.5, "quantile") == 2.0
    assert keep_threshold(scores, 0.9, "quantile") == pytest.approx(3.6)
    assert keep_threshold(np.array([1.0, 1.0, 3.0]), 0.25, "quantile") == 1.0


def test_normalised_threshold_scales_between_min_and_max():
    assert keep_threshold(np.array([0.0, 1.0, 2.0, 3.0, 4.0]), 0.5, "normalised") == 2.0
    # Quantile and normalised part here: 0.25 of the way from 1 to 3, not the 25th percentile (1.0).
    assert keep_threshold(np.array([1.0, 1.0, 3.0]), 0.25, "normalised") == 1.5
    assert keep_threshold(np.array([-2.0, 6.0, 0.0]), 0.0, "normalised") == -2.0


# ----------------------------------------------------------------------------- rest_rows


def improve(cfg, threshold):
    return Phase(0, 0, 0, cfg.rest.improve_steps, threshold=threshold, improve=0)


def test_sft_keeps_only_samples_strictly_above_the_cut():
    cfg = rest(threshold_on="normalised")
    grown = grown_set([0, 0, 1, 1, 2], ["a", "b", "c", "d", "e"], [0.0, 1.0, 2.0, 3.0, 4.0])
    rows, metrics = rest_rows(cfg, grown, improve(cfg, 0.5), None)
    assert rows == [{"prompt": "prompt 1", "completion": "d", "label": True},
                    {"prompt": "prompt 2", "completion": "e", "label": True}]
    assert metrics["rest/threshold"] == 2.0
    assert metrics["rest/kept"] == 2.0
    assert metrics["rest/kept_fraction"] == pytest.approx(0.4)
    assert metrics["rest/kept_reward"] == pytest.approx(3.5)
    assert metrics["rest/rows"] == 2.0


def test_sft_keeps_the_samples_at_the_cut_when_none_lies_above():
    cfg = rest()  # quantile
    grown = grown_set([0, 1, 2, 3], ["a", "b", "c", "d"], [1.0, 5.0, 5.0, 5.0])
    rows, metrics = rest_rows(cfg, grown, improve(cfg, 0.5), None)
    assert metrics["rest/threshold"] == 5.0
    assert [r["completion"] for r in rows] == ["b", "c", "d"]
    assert metrics["rest/kept"] == 3.0 and metrics["rest/kept_reward"] == 5.0


def test_sft_drops_empty_completions_and_ones_holding_the_eos_text():
    cfg = rest(threshold_on="normalised")
    grown = grown_set([0, 0, 0, 0, 0], ["low", "  ", "ends</s>here", "good", ""], [0.0, 9.0, 8.0, 7.0, 6.0])
    rows, metrics = rest_rows(cfg, grown, improve(cfg, 0.5), "</s>")
    assert [r["completion"] for r in rows] == ["good"]
    assert metrics["rest/kept"] == 1.0 and metrics["rest/kept_reward"] == 7.0
    assert metrics["rest/kept_fraction"] == pytest.approx(0.2)
    # Without an EOS text only the blank ones go.
    rows, _ = rest_rows(cfg, grown, improve(cfg, 0.5), None)
    assert [r["completion"] for r in rows] == ["ends</s>here", "good"]


def test_nothing_kept_gives_no_rows_and_a_nan_reward():
    cfg = rest(threshold_on="normalised")
    grown = grown_set([0, 0], ["low", ""], [0.0, 1.0])
    rows, metrics = rest_rows(cfg, grown, improve(cfg, 0.5), None)
    assert rows == [] and metrics["rest/kept"] == 0.0 and math.isnan(metrics["rest/kept_reward"])


def test_pairwise_loss_pairs_the_best_and_worst_kept_sample_of_each_prompt():
    cfg = rest(loss="dpo", threshold_on="normalised")
    grown = grown_set(
        [0, 0, 0, 0, 1, 1, 2, 2, 2],
        ["a-drop", "a-mid", "a-top", "a-low", "b-drop", "b-only", "c-same", "c-same", "c-drop"],
        [0.0, 7.0, 9.0, 6.0, 1.0, 8.0, 6.0, 8.0, 2.0],
    )
    rows, metrics = rest_rows(cfg, grown, improve(cfg, 0.5), None)
    # prompt 0: best and worst above the cut (4.5); prompt 1 keeps one sample (no pair);
    # prompt 2's two kept samples are the same text (no pair).
    assert rows == [{"prompt": "prompt 0", "chosen": "a-top", "rejected": "a-low"}]
    assert metrics["rest/kept"] == 6.0 and metrics["rest/rows"] == 1.0


def test_pairwise_loss_skips_unusable_kept_samples_before_pairing():
    cfg = rest(loss="ipo", threshold_on="normalised")
    grown = grown_set([0, 0, 0, 0], ["worst", "ok", "eos<|end|>", "best"], [0.0, 6.0, 5.5, 10.0])
    rows, _ = rest_rows(cfg, grown, improve(cfg, 0.5), "<|end|>")
    assert rows == [{"prompt": "prompt 0", "chosen": "best", "rejected": "ok"}]


# ----------------------------------------------------------------------------- iterative_rows


def test_iterative_rows_are_best_worst_pairs_of_each_prompt():
    cfg = iterative()
    grown = grown_set([0, 0, 0, 1, 1, 2, 2], ["x1", "x2", "x3", "y1", "y2", "z", "z"],
                      [0.3, 0.9, 0.1, 0.5, 0.5, 0.2, 0.8])
    phase = schedule(cfg)[1]
    rows, metrics = iterative_rows(cfg, grown, phase, None)
    # prompt 1 ties (no pair); prompt 2's texts are identical (no pair).
    assert rows == [{"prompt": "prompt 0", "chosen": "x2", "rejected": "x3"}]
    assert metrics == {"iterative/pairs": float(len(rows))}


def test_iterative_rows_follow_the_pairs_mode_min_gap_and_eos():
    cfg = iterative(pairs="all_pairs", min_gap=0.15)
    grown = grown_set([0, 0, 0, 0], ["a", "b", "c", "d</s>"], [0.1, 0.2, 0.9, 1.0])
    rows, metrics = iterative_rows(cfg, grown, schedule(cfg)[0], "</s>")
    assert {(r["chosen"], r["rejected"]) for r in rows} == {("c", "a"), ("c", "b")}
    assert metrics["iterative/pairs"] == 2.0


# ----------------------------------------------------------------------------- original_rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_original_rows_as_completions_or_pairs(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p1", "chosen": "good", "rejected": "bad"},
                                                  {"prompt": "p2", "chosen": "yes", "rejected": "no"}])
    cfg = rest(mix_original=True, tree={"data": {"path": data}})
    assert original_rows(cfg, True) == [{"prompt": "p1", "completion": "good", "label": True},
                                        {"prompt": "p2", "completion": "yes", "label": True}]
    assert original_rows(cfg, False) == [{"prompt": "p1", "chosen": "good", "rejected": "bad"},
                                         {"prompt": "p2", "chosen": "yes", "rejected": "no"}]


def test_original_rows_of_the_built_in_task():
    cfg = rest(tree={"data": {"task": "imdb_sentiment", "num_examples": 3}})
    rows = original_rows(cfg, False)
    assert len(rows) == 3
    assert all(set(r) == {"prompt", "chosen", "rejected"} and all(isinstance(v, str) for v in r.values())
               for r in rows)
    sft = original_rows(cfg, True)
    assert [(r["prompt"], r["completion"]) for r in sft] == [(r["prompt"], r["chosen"]) for r in rows]


def test_conversational_rows_cannot_be_mixed_in(tmp_path):
    turn = [{"role": "user", "content": "hi"}]
    data = write_jsonl(tmp_path / "chat.jsonl", [
        {"prompt": "p1", "chosen": "good", "rejected": "bad"},
        {"prompt": turn, "chosen": [{"role": "assistant", "content": "a"}],
         "rejected": [{"role": "assistant", "content": "b"}]},
    ])
    cfg = rest(tree={"data": {"path": data}})
    with pytest.raises(RoundError, match=r"chat\.jsonl line 2 has no text prompt.*rest\.mix_original: false"):
        original_rows(cfg, True)

"""Frontier and comparison-table arithmetic, checked against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest

from prefopt.tracking.frontier import (
    Point,
    RunCurve,
    compare,
    matched_kl,
    method_at_kl,
    pair_by_step,
    upper_frontier,
    value_at,
)

# A: (1, .2)  B: (2, .5)  C: (3, .6)  G: (3.5, .4)  D: (4, .9)  E: (5, .7)  F: (2, .3)
# Upper hull: C lies under B-D (at x=3 the segment is at .5 + .4 * 1/2 = .7 > .6), G lies
# under it too, E comes after the highest reward, F shares B's x with a lower reward.
# Hence the frontier A, B, D.
A, B, C, G, D, E, F = (Point(1, .2, 10), Point(2, .5, 20), Point(3, .6, 30), Point(3.5, .4, 35),
                       Point(4, .9, 40), Point(5, .7, 50), Point(2, .3, 60))
RUN1 = [A, B, C, G, D, E, F]


def xy(points):
    return [(p.x, p.y) for p in points]


def test_upper_frontier_by_hand():
    assert xy(upper_frontier(RUN1)) == [(1, .2), (2, .5), (4, .9)]


def test_upper_frontier_order_and_edge_cases():
    assert xy(upper_frontier(reversed(RUN1))) == [(1, .2), (2, .5), (4, .9)]
    assert upper_frontier([]) == []
    assert xy(upper_frontier([Point(3, .4)])) == [(3, .4)]
    # Collinear middle point goes; equal rewards keep only the lowest KL.
    assert xy(upper_frontier([Point(0, 0), Point(1, .5), Point(2, 1)])) == [(0, 0), (2, 1)]
    assert xy(upper_frontier([Point(1, .5), Point(2, .5), Point(3, .5)])) == [(1, .5)]
    # A point with lower KL and higher reward than all others is the whole frontier.
    assert xy(upper_frontier([Point(.5, 1.0), Point(1, .2), Point(2, .8)])) == [(.5, 1.0)]
    # Non-finite evaluations (a diverged run) are ignored.
    assert xy(upper_frontier([Point(math.nan, 1), Point(1, math.inf), Point(1, .3)])) == [(1, .3)]


def test_value_at_interpolates_then_stays_flat():
    front = upper_frontier(RUN1)  # (1, .2), (2, .5), (4, .9)
    assert value_at(front, 0.5) is None  # below the first evaluation: unknown
    assert value_at(front, 1) == pytest.approx(.2)
    assert value_at(front, 1.5) == pytest.approx(.35)
    assert value_at(front, 3) == pytest.approx(.7)
    assert value_at(front, 4) == pytest.approx(.9)
    assert value_at(front, 10) == pytest.approx(.9)
    assert value_at([], 1) is None


def test_pair_by_step_joins_on_step_and_keeps_last_value():
    xs = [(1, .1), (2, .2), (2, .25), (4, .4)]  # step 2 re-logged after a resume
    ys = [(2, 1.0), (3, 2.0), (1, .5)]
    assert pair_by_step(xs, ys) == [Point(.1, .5, 1), Point(.25, 1.0, 2)]


def test_matched_kl_is_largest_kl_every_series_reaches():
    assert matched_kl([[Point(0, 0), Point(5, 1)], [Point(1, 0), Point(6, 1), Point(2, 1)]]) == 5
    assert matched_kl([[], [Point(3, 1), Point(math.nan, 2)]]) == 3
    assert matched_kl([]) is None


def curves():
    run3 = [Point(.5, .1, 10), Point(1.5, .6, 20)]
    run2 = [Point(2, .3, 10), Point(4, .5, 20), Point(6, .8, 30)]
    return [
        RunCurve("r1", "dpo-a", "dpo", "beta=0.1", RUN1),
        RunCurve("r2", "ppo-a", "ppo", "", run2, win_rates={30: .6, 20: .4}),
        RunCurve("r3", "dpo-b", "dpo", "beta=1.0", run3, win_rates={10: .9}),
        RunCurve("r4", "broken", "dpo", "", [Point(math.nan, math.nan, 5)]),
    ]


def test_compare_by_hand():
    cmp = compare(curves())
    # Largest KL reached: dpo 5 (E), ppo 6 -> compare at KL 5.
    assert cmp.matched_kl == 5
    # dpo pools r1 and r3: (.5,.1) (1,.2) (1.5,.6) (2,.5) (3,.6) (3.5,.4) (4,.9) (5,.7) (2,.3).
    # (1,.2) lies under (.5,.1)-(1.5,.6); (2,.5) and (3,.6) under (1.5,.6)-(4,.9).
    assert xy(cmp.frontiers["dpo"]) == [(.5, .1), (1.5, .6), (4, .9)]
    # ppo: (4,.5) lies under (2,.3)-(6,.8), which is at .55 there.
    assert xy(cmp.frontiers["ppo"]) == [(2, .3), (6, .8)]
    assert list(cmp.series) == ["dpo", "ppo"]
    assert len(cmp.series["dpo"]) == 7 + 2
    assert cmp.series_at_matched_kl["dpo"] == pytest.approx(.9)
    assert cmp.series_at_matched_kl["ppo"] == pytest.approx(.3 + .5 * 3 / 4)  # .675

    rows = {r.run_id: r for r in cmp.rows}
    assert [r.run_id for r in cmp.rows] == ["r1", "r3", "r2"]  # by method, then reward at KL 5
    assert "r4" not in rows  # no finite evaluation
    r1, r2, r3 = rows["r1"], rows["r2"], rows["r3"]
    assert (r1.best_reward, r1.kl_at_best, r1.step_at_best) == (.9, 4, 40)
    assert r1.reward_at_matched_kl == pytest.approx(.9)
    assert r1.win_rate is None and r1.num_evals == 7
    assert (r3.best_reward, r3.kl_at_best, r3.win_rate) == (.6, 1.5, None)  # win rate at step 10
    assert r3.reward_at_matched_kl == pytest.approx(.6)
    assert (r2.best_reward, r2.kl_at_best, r2.win_rate) == (.8, 6, .6)
    assert r2.reward_at_matched_kl == pytest.approx(.675)
    assert r2.params == "" and r1.params == "beta=0.1"


def test_compare_at_given_kl():
    cmp = compare(curves(), at_kl=1.75)
    rows = {r.run_id: r for r in cmp.rows}
    assert cmp.matched_kl == 1.75
    assert rows["r1"].reward_at_matched_kl == pytest.approx(.2 + .3 * .75)  # on A-B
    assert rows["r2"].reward_at_matched_kl is None  # its first evaluation is at KL 2
    assert rows["r3"].reward_at_matched_kl == pytest.approx(.6)
    # dpo series on (1.5,.6)-(4,.9): .6 + .3 * .25 / 2.5 = .63
    assert cmp.series_at_matched_kl == {"dpo": pytest.approx(.63), "ppo": None}
    assert [r.run_id for r in cmp.rows] == ["r3", "r1", "r2"]


def test_best_reward_ties_prefer_lower_kl():
    cmp = compare([RunCurve("r", "r", "dpo", "", [Point(3, .5, 1), Point(2, .5, 2)])])
    assert (cmp.rows[0].kl_at_best, cmp.rows[0].step_at_best) == (2, 2)


def test_compare_nothing():
    cmp = compare([])
    assert cmp.rows == [] and cmp.matched_kl is None and cmp.frontiers == {}


# ----------------------------------------------------------------------------- errors and seeds


def _curve(name: str, method: str, seed: str | None, points: list[tuple[float, float, float | None]]) -> RunCurve:
    return RunCurve(run_id=name, run_name=name, method=method, params="", seed=seed,
                    points=[Point(x, y, i, None, se) for i, (x, y, se) in enumerate(points)])


def test_a_method_with_seeds_is_the_mean_of_its_seed_frontiers_with_their_standard_error():
    # Three seeds, each one run through (0, .2) and (2, r): at KL 1 each frontier gives (.2 + r) / 2.
    curves = [_curve(f"s{i}", "dpo", str(i), [(0, .2, .01), (2, r, .01)]) for i, r in enumerate((.6, .8, 1.0))]
    at = method_at_kl(curves, 1.0)
    values = [.4, .5, .6]  # mean .5, sample sd .1
    assert at.reward == pytest.approx(sum(values) / 3)
    assert at.se == pytest.approx(0.1 / math.sqrt(3))
    assert at.seeds == 3 and at.source == "seeds"


def test_one_seed_takes_the_evaluations_own_errors_interpolated():
    curve = _curve("one", "dpo", None, [(0, .2, .03), (2, .6, .04)])
    at = method_at_kl([curve], 0.5)  # a quarter of the way: value .3, error hypot(.75 * .03, .25 * .04)
    assert at.reward == pytest.approx(0.3)
    assert at.se == pytest.approx(math.hypot(.75 * .03, .25 * .04))
    assert at.seeds == 1 and at.source == "evaluation"
    assert method_at_kl([curve], 5.0).se == pytest.approx(.04)  # flat beyond the last vertex
    assert method_at_kl([_curve("late", "dpo", None, [(1, .5, .01)])], 0.5) is None


def test_differences_say_when_two_methods_are_within_their_errors():
    close = [_curve(f"a{i}", "a", str(i), [(0, .2, None), (2, r, None)]) for i, r in enumerate((.6, .7))]
    other = [_curve(f"b{i}", "b", str(i), [(0, .2, None), (2, r, None)]) for i, r in enumerate((.62, .72))]
    far = [_curve(f"c{i}", "c", str(i), [(0, .2, None), (2, r, None)]) for i, r in enumerate((.95, .96))]
    cmp = compare(close + other + far, levels=[2.0])
    diffs = {(d.a, d.b): d for d in cmp.differences}
    assert diffs[("a", "b")].diff == pytest.approx(-.02)
    assert diffs[("a", "b")].within_errors  # se of each: .05 -> combined .0707, interval holds 0
    assert not diffs[("a", "c")].within_errors and diffs[("a", "c")].diff == pytest.approx(.65 - .955)
    assert cmp.levels == [2.0] and [at.seeds for at in cmp.at_levels["c"]] == [2]


def test_the_default_levels_are_fractions_of_the_matched_kl_and_bands_need_two_seeds():
    seeds = [_curve(f"s{i}", "dpo", str(i), [(0, .2, None), (4, r, None)]) for i, r in enumerate((.6, .8))]
    single = [_curve("p", "ppo-gt", None, [(0, .2, .01), (4, .7, .01)])]
    cmp = compare(seeds + single)
    assert cmp.matched_kl == 4 and cmp.levels == [1.0, 2.0, 4.0]
    assert cmp.bands["ppo-gt"] == []
    band = cmp.bands["dpo"]
    assert band and all(lo <= hi for _, lo, hi in band) and band[-1][1] < band[-1][2]
    kl, lo, hi = band[-1]
    assert kl == pytest.approx(4) and (lo + hi) / 2 == pytest.approx(.7)


def test_a_run_on_gpus_carries_its_gpu_hours_into_the_table():
    from prefopt.tracking.report import display_rows

    gpu = _curve("on-gpus", "dpo", None, [(0, .2, .01), (1, .5, .01)])
    gpu.seconds, gpu.gpu_hours, gpu.tokens = 1800.0, 8 * 0.5, 12345.0
    cpu = _curve("on-cpus", "dpo", None, [(0, .2, .01), (1, .4, .01)])
    cpu.seconds = 60.0
    rows = {r[1]: r for r in display_rows(compare([gpu, cpu]))}
    assert rows["on-gpus"][-2:] == ["12,345", "1,800 (4.00 GPU-h)"]
    assert rows["on-cpus"][-1] == "60"

"""Reward-vs-KL frontiers and the comparison table, as plain arithmetic (no MLflow here).

Every evaluation of a run is a point (x = KL to the reference, y = reward). A method's
frontier is the upper concave hull of its points, cut at its highest reward: a mixture of two
evaluated policies earns the mixed reward (linear in the policy) at no more than the mixed KL
(KL is convex), so every point on a hull segment is achievable. Beyond its last vertex the
frontier stays flat: a larger KL budget can always keep the best policy. Below its first
vertex it is undefined (no evaluated policy is that close to the reference).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Point:
    x: float  # e.g. eval/kl
    y: float  # e.g. eval/reward
    step: int = 0
    x_se: float | None = None  # the evaluation's standard errors over prompts, when logged
    y_se: float | None = None


@dataclass
class RunCurve:
    """One run's evaluations, as read from the tracking store."""

    run_id: str
    run_name: str
    method: str  # the series: 'dpo', 'ppo-gt', 'ppo-rm-rloo' (compare.method_of)
    params: str  # the method's parameters, for the table ('beta=0.1')
    points: list[Point]
    win_rates: dict[int, float] = field(default_factory=dict)  # step -> eval/win_rate
    seed: str | None = None  # a sweep trial's seed: runs of one method and seed make one frontier
    tokens: float | None = None  # the compute the run used: tokens trained on, wall seconds, GPU-hours
    seconds: float | None = None
    gpu_hours: float | None = None  # None on CPU ranks


@dataclass
class AtKL:
    """A method's frontier reward at one KL level, with its standard error."""

    kl: float
    reward: float
    se: float | None
    seeds: int  # seed frontiers that reach this KL; with 2 or more, se is over seeds
    source: str  # "seeds": the spread of the seeds' frontiers; "evaluation": the points' own errors; "limit"


@dataclass
class Difference:
    """method a minus method b at one KL level, with a 95% interval (errors combined in quadrature)."""

    a: str
    b: str
    kl: float
    diff: float
    se: float | None

    @property
    def interval(self) -> tuple[float, float] | None:
        return None if self.se is None else (self.diff - 1.96 * self.se, self.diff + 1.96 * self.se)

    @property
    def within_errors(self) -> bool:
        """The interval holds 0: the data cannot tell the two methods apart at this KL."""
        lo_hi = self.interval
        return lo_hi is None or lo_hi[0] <= 0 <= lo_hi[1]


@dataclass
class RunSummary:
    """One row of the comparison table."""

    run_id: str
    run_name: str
    method: str
    params: str
    num_evals: int
    best_reward: float
    kl_at_best: float
    step_at_best: int
    reward_at_matched_kl: float | None
    win_rate: float | None  # at the evaluation with the best reward, when logged
    best_reward_se: float | None = None
    seed: str | None = None
    tokens: float | None = None
    seconds: float | None = None
    gpu_hours: float | None = None


@dataclass
class Comparison:
    rows: list[RunSummary]
    matched_kl: float | None
    series: dict[str, list[Point]]  # method -> every point of its runs
    frontiers: dict[str, list[Point]]  # method -> hull vertices, KL and reward increasing
    series_at_matched_kl: dict[str, float | None]
    levels: list[float] = field(default_factory=list)  # KLs of the matched-KL table
    at_levels: dict[str, list[AtKL | None]] = field(default_factory=dict)  # method -> one per level
    differences: list[Difference] = field(default_factory=list)
    bands: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)  # method -> (kl, lo, hi)
    # Where the reward is known: "best-of-N" and "optimum" curves (prefopt.eval.limits), their
    # rewards at each level, and every evaluation above the optimum by more than twice the
    # combined error: (run name, step, kl, reward, optimum's reward there).
    limits: dict[str, list[Point]] = field(default_factory=dict)
    limits_at_levels: dict[str, list[AtKL | None]] = field(default_factory=dict)
    above_optimum: list[tuple[str, int, float, float, float]] = field(default_factory=list)


def pair_by_step(xs: Iterable[tuple[int, float]], ys: Iterable[tuple[int, float]]) -> list[Point]:
    """Join two metric histories [(step, value)] on step, in step order.

    A step logged twice (a resumed run re-evaluating) keeps the value logged last.
    """
    x_at = dict(xs)
    y_at = dict(ys)
    return [Point(x_at[s], y_at[s], s) for s in sorted(x_at.keys() & y_at.keys())]


def _cross(o: Point, a: Point, b: Point) -> float:
    return (a.x - o.x) * (b.y - o.y) - (a.y - o.y) * (b.x - o.x)


def upper_frontier(points: Iterable[Point]) -> list[Point]:
    """Vertices of the upper concave hull up to the highest reward; x and y strictly increase.

    Non-finite points are ignored. Among equal x only the highest y counts; collinear middle
    points are dropped.
    """
    best_at_x: dict[float, Point] = {}
    for p in points:
        if math.isfinite(p.x) and math.isfinite(p.y) and (p.x not in best_at_x
                                                          or p.y > best_at_x[p.x].y):
            best_at_x[p.x] = p
    hull: list[Point] = []
    for p in sorted(best_at_x.values(), key=lambda q: q.x):
        # Left to right, the upper hull only turns clockwise (negative cross product).
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) >= 0:
            hull.pop()
        hull.append(p)
    if not hull:
        return []
    top = max(range(len(hull)), key=lambda i: (hull[i].y, -i))  # first highest vertex
    return hull[: top + 1]


def value_at(frontier: Sequence[Point], x: float) -> float | None:
    """Reward the frontier reaches within KL budget x; None below its first vertex."""
    if not frontier or x < frontier[0].x:
        return None
    for a, b in zip(frontier, frontier[1:], strict=False):
        if x <= b.x:
            return a.y + (b.y - a.y) * (x - a.x) / (b.x - a.x)
    return frontier[-1].y


def matched_kl(series: Iterable[Sequence[Point]]) -> float | None:
    """The largest KL that every series reaches: the smallest of the series' largest KLs.

    This is the top of the KL range all methods cover, where their frontiers are the most
    developed (the bottom is often 0, an evaluation of the reference itself).
    """
    ends = [max(xs) for s in series if (xs := [p.x for p in s if math.isfinite(p.x)])]
    return min(ends) if ends else None


def summarise_run(curve: RunCurve, at_kl: float | None) -> RunSummary | None:
    """The table row of one run, or None when it has no finite evaluation."""
    finite = [p for p in curve.points if math.isfinite(p.x) and math.isfinite(p.y)]
    if not finite:
        return None
    best = min(finite, key=lambda p: (-p.y, p.x, p.step))  # highest reward, then lowest KL
    return RunSummary(
        run_id=curve.run_id,
        run_name=curve.run_name,
        method=curve.method,
        params=curve.params,
        num_evals=len(finite),
        best_reward=best.y,
        kl_at_best=best.x,
        step_at_best=best.step,
        reward_at_matched_kl=None if at_kl is None else value_at(upper_frontier(finite), at_kl),
        win_rate=curve.win_rates.get(best.step),
        best_reward_se=best.y_se,
        seed=curve.seed,
        tokens=curve.tokens,
        seconds=curve.seconds,
        gpu_hours=curve.gpu_hours,
    )


def compare(curves: Sequence[RunCurve], at_kl: float | None = None,
            levels: Sequence[float] | None = None, limits: dict[str, list[Point]] | None = None) -> Comparison:
    """Frontiers per method and one summary row per run with an evaluation.

    `at_kl` is the KL budget where runs are compared, by default `matched_kl` of the methods.
    A run whose first evaluation lies above it has no value there. Rows are ordered by method,
    then by reward at that KL.
    """
    usable = [c for c in curves if upper_frontier(c.points)]
    series: dict[str, list[Point]] = {}
    for c in usable:
        series.setdefault(c.method, []).extend(c.points)
    series = dict(sorted(series.items()))
    if at_kl is None:
        at_kl = matched_kl(series.values())
    rows = [r for c in usable if (r := summarise_run(c, at_kl)) is not None]
    rows.sort(key=lambda r: (r.method, -_or_minus_inf(r.reward_at_matched_kl), -r.best_reward,
                             r.run_name))
    frontiers = {m: upper_frontier(pts) for m, pts in series.items()}
    at_matched = {m: None if at_kl is None else value_at(f, at_kl) for m, f in frontiers.items()}
    levels = kl_levels(at_kl, levels)
    by_method: dict[str, list[RunCurve]] = {}
    for c in usable:
        by_method.setdefault(c.method, []).append(c)
    at_levels = {m: [method_at_kl(by_method[m], kl) for kl in levels] for m in series}
    limits = dict(limits or {})
    return Comparison(rows=rows, matched_kl=at_kl, series=series, frontiers=frontiers,
                      series_at_matched_kl=at_matched, levels=levels, at_levels=at_levels,
                      differences=differences(at_levels, levels),
                      bands={m: band(by_method[m]) for m in series}, limits=limits,
                      limits_at_levels={name: [limit_at(pts, kl) for kl in levels] for name, pts in limits.items()},
                      above_optimum=above(usable, limits.get("optimum", [])))


def limit_at(curve: Sequence[Point], x: float) -> AtKL | None:
    """A limit curve's reward at x, linear between its points (KL increasing), with the error
    interpolated alike; None outside the KLs it was estimated at (it is not extended)."""
    pts = sorted(curve, key=lambda p: p.x)
    if not pts or x < pts[0].x or x > pts[-1].x:
        return None
    for a, b in zip(pts, pts[1:], strict=False):
        if x <= b.x:
            t = 0.0 if b.x == a.x else (x - a.x) / (b.x - a.x)
            se = None if a.y_se is None or b.y_se is None else math.hypot((1 - t) * a.y_se, t * b.y_se)
            return AtKL(x, a.y + t * (b.y - a.y), se, 1, "limit")
    return AtKL(x, pts[-1].y, pts[-1].y_se, 1, "limit")


def above(curves: Sequence[RunCurve], optimum: Sequence[Point]) -> list[tuple[str, int, float, float, float]]:
    """Evaluations whose reward exceeds the optimum's at their KL by more than twice their errors
    combined: no policy can do that, so each one says a KL is underestimated or the runs were
    evaluated unlike the limit (docs/limits.md)."""
    out = []
    for c in curves:
        for p in c.points:
            at = limit_at(optimum, p.x)
            if at is None:
                continue
            se = math.hypot(p.y_se or 0.0, at.se or 0.0)
            if p.y - at.reward > 2 * se:
                out.append((c.run_name, p.step, p.x, p.y, at.reward))
    return out


def kl_levels(matched: float | None, given: Sequence[float] | None = None) -> list[float]:
    """The KLs of the matched-KL table: those given, else a quarter, a half and all of the matched KL."""
    if given:
        return sorted(given)
    if matched is None or not math.isfinite(matched) or matched <= 0:
        return []
    return [matched / 4, matched / 2, matched]


def seed_frontiers(curves: Sequence[RunCurve]) -> list[list[Point]]:
    """One frontier per seed over the method's runs of that seed (runs of no sweep: one group)."""
    groups: dict[str | None, list[Point]] = {}
    for c in curves:
        groups.setdefault(c.seed, []).extend(c.points)
    return [f for pts in groups.values() if (f := upper_frontier(pts))]


def method_at_kl(curves: Sequence[RunCurve], kl: float) -> AtKL | None:
    """The method's frontier reward at `kl` and its standard error: over its seeds' frontiers
    when two or more reach `kl` (training and evaluation noise both), else from the evaluations'
    own errors at the two vertices around `kl` (evaluation noise only). None when no frontier
    reaches down to `kl`."""
    values = [v for f in seed_frontiers(curves) if (v := value_at(f, kl)) is not None]
    if not values:
        return None
    if len(values) >= 2:
        mean = sum(values) / len(values)
        spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
        return AtKL(kl, mean, spread, len(values), "seeds")
    frontier = seed_frontiers(curves)[0]
    return AtKL(kl, values[0], se_at(frontier, kl), 1, "evaluation")


def se_at(frontier: Sequence[Point], x: float) -> float | None:
    """The evaluation error of a frontier's value at x: interpolated like the value, from the
    vertices' own y errors (None when they were not logged)."""
    if not frontier or x < frontier[0].x:
        return None
    for a, b in zip(frontier, frontier[1:], strict=False):
        if x <= b.x:
            if a.y_se is None or b.y_se is None:
                return None
            t = (x - a.x) / (b.x - a.x)
            return math.hypot((1 - t) * a.y_se, t * b.y_se)
    return frontier[-1].y_se


def differences(at_levels: dict[str, list[AtKL | None]], levels: Sequence[float]) -> list[Difference]:
    """Every pair of methods at every level both reach: a − b, in the table's method order."""
    out = []
    methods = list(at_levels)
    for i, kl in enumerate(levels):
        for ai, a in enumerate(methods):
            for b in methods[ai + 1:]:
                va, vb = at_levels[a][i], at_levels[b][i]
                if va is None or vb is None:
                    continue
                se = None if va.se is None or vb.se is None else math.hypot(va.se, vb.se)
                out.append(Difference(a, b, kl, va.reward - vb.reward, se))
    return out


def band(curves: Sequence[RunCurve], num: int = 40) -> list[tuple[float, float, float]]:
    """The band the method's seeds spread over: (kl, mean − se, mean + se) on a KL grid, where
    two or more seed frontiers reach; empty with fewer than two seeds."""
    frontiers = seed_frontiers(curves)
    if len(frontiers) < 2:
        return []
    lo, hi = max(f[0].x for f in frontiers), max(f[-1].x for f in frontiers)
    out = []
    for i in range(num + 1):
        kl = lo + (hi - lo) * i / num
        at = method_at_kl(curves, kl)
        if at is not None and at.se is not None and at.seeds >= 2:
            out.append((kl, at.reward - at.se, at.reward + at.se))
    return out


def _or_minus_inf(value: float | None) -> float:
    return -math.inf if value is None else value

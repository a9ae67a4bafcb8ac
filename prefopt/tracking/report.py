"""Writes a Comparison out: the frontier plot (PNG), the table as CSV and as markdown.

No MLflow here, and no pyplot: figures are drawn on matplotlib's Agg canvas directly, so
nothing depends on (or changes) a display backend.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from prefopt.tracking.frontier import Comparison

# CSV columns, in order. "reward" is the --y metric and "kl" the --x metric.
CSV_COLUMNS = (
    "method", "run_name", "params", "seed", "best_reward", "best_reward_se", "kl_at_best", "step_at_best",
    "reward_at_matched_kl", "matched_kl", "win_rate", "num_evals", "tokens", "seconds", "gpu_hours", "run_id",
)


def fmt(value: float | int | str | None) -> str:
    """A number for people: 4 significant digits; '-' when missing."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def pm(value: float | None, se: float | None) -> str:
    """'0.812 ± 0.011'; the value alone without an error; '-' when missing."""
    if value is None:
        return "-"
    return fmt(value) if se is None else f"{value:.3f} ± {se:.3f}"


def headers(comparison: Comparison, x: str, y: str) -> list[str]:
    """Column titles of the printed and markdown tables ('eval/reward' shows as 'reward')."""
    xs, ys = x.rsplit("/", 1)[-1], y.rsplit("/", 1)[-1]
    at = f"{ys} at {xs}={fmt(comparison.matched_kl)}"
    return ["method", "run", "params", f"best {ys}", f"{xs} at best", at, "win rate", "evals", "tokens",
            "seconds"]


def display_rows(comparison: Comparison) -> list[list[str]]:
    return [
        [r.method, r.run_name, r.params or "-", pm(r.best_reward, r.best_reward_se), fmt(r.kl_at_best),
         fmt(r.reward_at_matched_kl), fmt(r.win_rate), str(r.num_evals), _count(r.tokens),
         _count(r.seconds) + (f" ({r.gpu_hours:.2f} GPU-h)" if r.gpu_hours else "")]
        for r in comparison.rows
    ]


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def level_headers(comparison: Comparison, x: str) -> list[str]:
    xs = x.rsplit("/", 1)[-1]
    return ["method"] + [f"at {xs}={fmt(kl)}" for kl in comparison.levels]


def level_rows(comparison: Comparison) -> list[list[str]]:
    """The matched-KL table: each method's frontier reward ± its error at each level; the error is
    over seeds ("n seeds") where two or more reach the level, else the evaluation's own ("eval");
    then the limits (best-of-N, the optimum) where the reward is known."""
    rows = []
    for method, cells in [*comparison.at_levels.items(), *comparison.limits_at_levels.items()]:
        row = [method]
        for at in cells:
            row.append("-" if at is None else pm(at.reward, at.se)
                       + {"seeds": f" ({at.seeds} seeds)", "evaluation": " (eval)", "limit": " (limit)"}[at.source])
        rows.append(row)
    return rows


def above_lines(comparison: Comparison) -> list[str]:
    """Evaluations above the optimum by more than their errors: each one a finding to explain."""
    return [f"ABOVE THE OPTIMUM: {name} at step {step}: reward {y:.3f} at KL {x:.3f}, the optimum's {opt:.3f} "
            "(docs/limits.md: what it means)" for name, step, x, y, opt in comparison.above_optimum]


def difference_lines(comparison: Comparison, x: str) -> list[str]:
    """Each pair of methods at each level: the difference, its 95% interval, and whether the data
    can tell them apart."""
    xs = x.rsplit("/", 1)[-1]
    lines = []
    for d in comparison.differences:
        interval = d.interval
        if interval is None:
            lines.append(f"{d.a} − {d.b} at {xs}={fmt(d.kl)}: {d.diff:+.3f} (no error logged)")
            continue
        verdict = ("within errors: the data cannot tell them apart" if d.within_errors
                   else f"{d.a if d.diff > 0 else d.b} higher, by {abs(d.diff) / d.se:.1f} standard errors")
        lines.append(f"{d.a} − {d.b} at {xs}={fmt(d.kl)}: {d.diff:+.3f} ± {d.se:.3f} "
                     f"(95%: {interval[0]:+.3f} to {interval[1]:+.3f}); {verdict}")
    return lines


def write_csv(comparison: Comparison, path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in comparison.rows:
            record = {c: getattr(r, c, None) for c in CSV_COLUMNS}
            record["matched_kl"] = comparison.matched_kl
            writer.writerow({k: "" if v is None else v for k, v in record.items()})
    return path


def write_markdown(comparison: Comparison, path: Path, *, experiment: str, x: str,
                   y: str) -> Path:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    head = headers(comparison, x, y)
    lines = [f"# {experiment}: {y} vs {x}", ""]
    lines += [line(head), line(["---"] * len(head))]
    lines += [line(cells) for cells in display_rows(comparison)]
    if comparison.matched_kl is not None:
        lines += ["", f"Frontier of each method at {x} = {fmt(comparison.matched_kl)}: "
                  + ", ".join(f"{m} {fmt(v)}" for m, v in comparison.series_at_matched_kl.items())
                  + "."]
    if comparison.levels:
        head = level_headers(comparison, x)
        lines += ["", f"## {y} at matched {x}", "", line(head), line(["---"] * len(head))]
        lines += [line(cells) for cells in level_rows(comparison)]
        if comparison.differences:
            lines += [""] + [f"- {text}" for text in difference_lines(comparison, x)]
    lines += [f"- {text}" for text in above_lines(comparison)]
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_frontier(comparison: Comparison, path: Path, *, x: str, y: str, title: str) -> Path:
    """One colour per method: its evaluations as dots, its frontier as a line through the
    hull vertices, dashed where it stays flat beyond the last vertex; the matched KL dotted."""
    fig = Figure(figsize=(8, 5.5), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = [p.x for pts in comparison.series.values() for p in pts if math.isfinite(p.x)]
    x_max = max(xs) if xs else 1.0
    colours = [f"C{i % 10}" for i in range(len(comparison.series))]
    for colour, (method, points) in zip(colours, comparison.series.items(), strict=True):
        runs = sum(1 for r in comparison.rows if r.method == method)
        # Every evaluation with its standard errors over prompts (where logged).
        ax.errorbar([p.x for p in points], [p.y for p in points],
                    xerr=[p.x_se or 0.0 for p in points], yerr=[p.y_se or 0.0 for p in points],
                    fmt="o", ms=3, alpha=0.35, color=colour, elinewidth=0.8, capsize=0)
        if band := comparison.bands.get(method):  # the spread of its seeds' frontiers (± one error)
            ax.fill_between([b[0] for b in band], [b[1] for b in band], [b[2] for b in band],
                            color=colour, alpha=0.15, linewidth=0)
        hull = comparison.frontiers[method]
        ax.plot([p.x for p in hull], [p.y for p in hull], "-o", color=colour, lw=2, ms=5,
                label=f"{method} ({runs} run{'s' if runs != 1 else ''}, {len(points)} evals)")
        if hull and hull[-1].x < x_max:
            ax.plot([hull[-1].x, x_max], [hull[-1].y] * 2, "--", color=colour, lw=1.2)
    for name, style in (("best-of-N", ":s"), ("optimum", "--")):
        if pts := sorted(comparison.limits.get(name, []), key=lambda p: p.x):
            ax.errorbar([p.x for p in pts], [p.y for p in pts], yerr=[p.y_se or 0.0 for p in pts], fmt=style,
                        color="black", lw=1.2, ms=3, capsize=0, label=f"{name} (limit, from the reference)")
    if comparison.matched_kl is not None:
        ax.axvline(comparison.matched_kl, color="0.4", ls=":", lw=1.2,
                   label=f"matched {x} = {fmt(comparison.matched_kl)}")
    if xs and min(xs) >= 0:  # a KL: nothing left of zero (the reference itself) but margin
        ax.set_xlim(left=-0.02 * x_max)
    ax.set_xlabel(f"{x} (lower is closer to the reference)")
    ax.set_ylabel(f"{y} (higher is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if comparison.series:
        ax.legend(loc="best", fontsize=9)
    fig.savefig(path)
    return path

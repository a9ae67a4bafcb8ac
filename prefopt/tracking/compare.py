"""`prefopt compare`: pull an experiment's runs, compare their frontiers, write and log it all.

The arithmetic is in prefopt.tracking.frontier and the files in prefopt.tracking.report; this
module only talks to MLflow.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run, ViewType

from prefopt.tracking.frontier import Comparison, RunCurve, compare, pair_by_step
from prefopt.tracking.report import plot_frontier, write_csv, write_markdown
from prefopt.tracking.store import TrackingError, find_experiment, mlflow_client, slug
from prefopt.tracking.tracker import TAG_ALGORITHM, TAG_COMPARISON, TAG_LOSS, TAG_SWEEP, TAG_SWEEP_PARENT

DEFAULT_X = "eval/kl"
DEFAULT_Y = "eval/reward"
WIN_RATE = "eval/win_rate"
PNG, CSV, MARKDOWN = "frontier.png", "comparison.csv", "comparison.md"


@dataclass
class ComparisonResult:
    comparison: Comparison
    png: Path
    csv: Path
    markdown: Path
    comparison_run_id: str
    skipped: list[str]  # names of runs that lack the x or the y metric


def search_runs(client: MlflowClient, experiment_id: str, *,
                max_results: int | None = None) -> list[Run]:
    """Active runs of an experiment, newest first, across all result pages."""
    runs: list[Run] = []
    token = None
    while max_results is None or len(runs) < max_results:
        want = 1000 if max_results is None else min(1000, max_results - len(runs))
        page = client.search_runs([experiment_id], run_view_type=ViewType.ACTIVE_ONLY,
                                  max_results=want, order_by=["attributes.start_time DESC"],
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    return runs


def is_comparison(run: Run) -> bool:
    return run.data.tags.get(TAG_COMPARISON) == "true"


def method_of(run: Run) -> str:
    """The series a run belongs to: an offline run's loss ('dpo', 'simpo'), else its algorithm ('ppo')."""
    tags, params = run.data.tags, run.data.params
    algorithm = tags.get(TAG_ALGORITHM)
    if algorithm and algorithm != "offline":
        return algorithm
    return tags.get(TAG_LOSS) or params.get("algorithm.name") or "unknown"


def params_of(run: Run) -> str:
    """The algorithm parameters the run set: 'beta=0.1 label_smoothing=0.05'."""
    chosen = sorted(
        (k.removeprefix("algorithm."), v) for k, v in run.data.params.items()
        if k.startswith("algorithm.") and k != "algorithm.name" and v not in ("null", "None", "")
    )
    return " ".join(f"{k}={v}" for k, v in chosen)


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    metrics = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step))
    return [(m.step, m.value) for m in metrics]


def load_curves(client: MlflowClient, runs: list[Run], *, x: str,
                y: str) -> tuple[list[RunCurve], list[str]]:
    """Evaluation points of each run that logged both metrics, and the names of the rest."""
    curves, skipped = [], []
    for run in runs:
        if x not in run.data.metrics or y not in run.data.metrics:
            skipped.append(run.info.run_name)
            continue
        run_id = run.info.run_id
        points = pair_by_step(_history(client, run_id, x), _history(client, run_id, y))
        win = dict(_history(client, run_id, WIN_RATE)) if WIN_RATE in run.data.metrics else {}
        curves.append(RunCurve(run_id=run_id, run_name=run.info.run_name, method=method_of(run),
                               params=params_of(run), points=points, win_rates=win))
    return curves, skipped


def sweep_experiment(uri: str, sweep: str) -> str:
    """The experiment of sweep `sweep`'s parent run (prefopt.sweep), or a TrackingError."""
    client = mlflow_client(uri)
    for exp in client.search_experiments():
        found = client.search_runs([exp.experiment_id], max_results=1, filter_string=(
            f"tags.`{TAG_SWEEP}` = '{sweep}' and tags.`{TAG_SWEEP_PARENT}` = 'true'"))
        if found:
            return exp.name
    raise TrackingError(f"no sweep {sweep!r} in {uri} (the parent run's tag {TAG_SWEEP}; `prefopt sweep` "
                        "prints it at its end)")


def run_comparison(uri: str, experiment: str, *, out_dir: Path, x: str = DEFAULT_X,
                   y: str = DEFAULT_Y, at_kl: float | None = None, sweep: str | None = None) -> ComparisonResult:
    """Compare every run of `experiment` (or of sweep `sweep` only: its trials); write
    PNG/CSV/markdown to `out_dir` and log them into a new comparison run of the same experiment."""
    client = mlflow_client(uri)
    exp = find_experiment(client, experiment, uri)
    runs = [r for r in search_runs(client, exp.experiment_id)
            if not is_comparison(r) and r.data.tags.get(TAG_SWEEP_PARENT) != "true"
            and (sweep is None or r.data.tags.get(TAG_SWEEP) == sweep)]
    curves, skipped = load_curves(client, runs, x=x, y=y)
    comparison = compare(curves, at_kl=at_kl)
    if not comparison.rows:
        raise TrackingError(
            f"no run of experiment {experiment!r} in {uri} has both {x} and {y} logged at the "
            f"same step ({len(runs)} runs looked at)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_frontier(comparison, out_dir / PNG, x=x, y=y, title=f"{experiment}: {y} vs {x}")
    csv_path = write_csv(comparison, out_dir / CSV)
    md = write_markdown(comparison, out_dir / MARKDOWN, experiment=experiment, x=x, y=y)

    tags = {TAG_COMPARISON: "true", "compare.x": x, "compare.y": y}
    note = md.read_text()
    if len(note) <= 5000:  # shown as the run's description in the MLflow UI
        tags["mlflow.note.content"] = note
    run = client.create_run(exp.experiment_id, run_name=f"compare-{time.strftime('%Y%m%d-%H%M%S')}",
                            tags=tags)
    run_id = run.info.run_id
    try:
        for path in (png, csv_path, md):
            client.log_artifact(run_id, str(path))
        if comparison.matched_kl is not None:
            client.log_metric(run_id, "matched_kl", comparison.matched_kl)
            for method, value in comparison.series_at_matched_kl.items():
                if value is not None:
                    client.log_metric(run_id, f"frontier_at_matched_kl/{slug(method)}", value)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return ComparisonResult(comparison=comparison, png=png, csv=csv_path, markdown=md,
                            comparison_run_id=run_id, skipped=skipped)

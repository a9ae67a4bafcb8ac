"""`prefopt compare`: pull an experiment's runs, compare their frontiers, write and log it all.

The arithmetic is in prefopt.tracking.frontier and the files in prefopt.tracking.report; this
module only talks to MLflow.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run, ViewType

from prefopt.tracking.frontier import Comparison, Point, RunCurve, compare, pair_by_step
from prefopt.tracking.report import plot_frontier, write_csv, write_markdown
from prefopt.tracking.store import TrackingError, find_experiment, mlflow_client, slug
from prefopt.tracking.tracker import (
    LIMITS_ARTIFACT,
    TAG_ALGORITHM,
    TAG_COMPARISON,
    TAG_EVAL_FINGERPRINT,
    TAG_EVAL_LIMITS,
    TAG_LOSS,
    TAG_SWEEP,
    TAG_SWEEP_PARENT,
    TAG_SWEEP_SEED,
)

DEFAULT_X = "eval/kl"
DEFAULT_Y = "eval/reward"
WIN_RATE = "eval/win_rate"
TOKENS = "compute/tokens"  # tokens trained on so far (stages.run_steps)
GPUS = "compute/gpus"  # GPUs the run's ranks held (Session.tracking)
PNG, CSV, MARKDOWN = "frontier.png", "comparison.csv", "comparison.md"


@dataclass
class ComparisonResult:
    comparison: Comparison
    png: Path
    csv: Path
    markdown: Path
    comparison_run_id: str  # where it was logged: the sweep's parent run, or a new comparison run
    skipped: list[str]  # names of runs that lack the x or the y metric
    fingerprint: str | None = None  # the evaluation the compared runs share
    evaluated_apart: dict[str, list[str]] = field(default_factory=dict)  # other fingerprints -> run names


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


# reward.source -> how the DPO paper names PPO on it: ground truth, a reward model, a judge.
PPO_REWARD = {"task": "gt", "model": "rm", "judge": "judge"}


# Multi-round algorithms and the loss their rounds train by default (prefopt.algorithms.rounds).
ROUND_LOSS = {"rest": "sft", "iterative_dpo": "dpo"}


def method_of(run: Run) -> str:
    """The series a run belongs to, saying what the method is: an offline run's loss ('dpo',
    'simpo'); PPO with its reward source and, when not GAE, its advantage estimator ('ppo-gt',
    'ppo-rm', 'ppo-judge-rloo'); ReST and iterative DPO ('rest', 'rest-dpo', 'iterative_dpo-ipo');
    else the algorithm."""
    tags, params = run.data.tags, run.data.params
    algorithm = tags.get(TAG_ALGORITHM)
    if algorithm == "ppo":
        source = PPO_REWARD.get(params.get("reward.source", "task"), params.get("reward.source", "task"))
        advantage = params.get("ppo.advantage", "gae")
        return f"ppo-{source}" + ("" if advantage == "gae" else f"-{advantage}")
    if algorithm in ROUND_LOSS:  # with the loss its rounds train, when not the usual one: 'rest-dpo'
        loss = tags.get(TAG_LOSS, ROUND_LOSS[algorithm])
        return algorithm if loss == ROUND_LOSS[algorithm] else f"{algorithm}-{loss}"
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
    """Evaluation points of each run that logged both metrics (with their standard errors where
    logged), and the names of the rest."""
    curves, skipped = [], []
    for run in runs:
        if x not in run.data.metrics or y not in run.data.metrics:
            skipped.append(run.info.run_name)
            continue
        run_id = run.info.run_id
        x_se, y_se = (dict(_history(client, run_id, f"{key}_se")) if f"{key}_se" in run.data.metrics else {}
                      for key in (x, y))
        points = [Point(p.x, p.y, p.step, x_se.get(p.step), y_se.get(p.step))
                  for p in pair_by_step(_history(client, run_id, x), _history(client, run_id, y))]
        win = dict(_history(client, run_id, WIN_RATE)) if WIN_RATE in run.data.metrics else {}
        end = run.info.end_time or run.info.start_time
        seconds = (end - run.info.start_time) / 1000 if end else None
        gpus = run.data.metrics.get(GPUS)
        curves.append(RunCurve(run_id=run_id, run_name=run.info.run_name, method=method_of(run),
                               params=params_of(run), points=points, win_rates=win,
                               seed=run.data.tags.get(TAG_SWEEP_SEED), tokens=run.data.metrics.get(TOKENS),
                               seconds=seconds, gpu_hours=seconds * gpus / 3600 if seconds and gpus else None))
    return curves, skipped


def load_limits(client: MlflowClient, runs: list[Run]) -> dict[str, list[Point]]:
    """Best-of-N and the optimum, from the first run evaluated alike that logged them
    (eval.limit_samples; the same prompts, sampler and reference draw the same limits)."""
    import json
    import os
    import tempfile

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file: no bar
    for run in runs:
        if TAG_EVAL_LIMITS not in run.data.tags:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            data = json.loads(Path(client.download_artifacts(run.info.run_id, LIMITS_ARTIFACT, tmp)).read_text())
        return {name: [Point(p["kl"], p["reward"], 0, p["kl_se"], p["reward_se"]) for p in data[key]
                       if p.get("reliable", True)]
                for name, key in (("best-of-N", "best_of_n"), ("optimum", "optimum"))}
    return {}


def by_evaluation(runs: list[Run], chosen: str | None = None) -> tuple[list[Run], dict[str, list[str]]]:
    """The runs that were evaluated alike (one eval.fingerprint: prompts, sampler, samples per
    prompt, KL estimator), and the others by fingerprint (run names). chosen: the fingerprint to
    keep (a prefix is enough); default: the one most runs share. Runs from before the tag are
    their own group, "unknown"."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.data.tags.get(TAG_EVAL_FINGERPRINT, "unknown"), []).append(run)
    if not groups:
        return [], {}
    if chosen is None:
        keep = max(groups, key=lambda k: (len(groups[k]), k != "unknown"))
    else:
        matches = [k for k in groups if k.startswith(chosen)]
        if len(matches) != 1:
            raise TrackingError(f"--eval-fingerprint {chosen}: {'no' if not matches else 'more than one'} "
                                f"evaluation fingerprint matches; the runs have: {', '.join(sorted(groups))}")
        keep = matches[0]
    others = {k: [r.info.run_name for r in v] for k, v in groups.items() if k != keep}
    return groups[keep], others


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


def run_comparison(uri: str, experiment: str, *, out_dir: Path, x: str = DEFAULT_X, y: str = DEFAULT_Y,
                   at_kl: float | None = None, sweep: str | None = None, levels: list[float] | None = None,
                   eval_fingerprint: str | None = None) -> ComparisonResult:
    """Compare the runs of `experiment` (or of sweep `sweep` only: its trials) that were evaluated
    alike; write PNG/CSV/markdown to `out_dir` and log them into the sweep's parent run, or a new
    comparison run of the experiment."""
    client = mlflow_client(uri)
    exp = find_experiment(client, experiment, uri)
    runs = [r for r in search_runs(client, exp.experiment_id)
            if not is_comparison(r) and r.data.tags.get(TAG_SWEEP_PARENT) != "true"
            and (sweep is None or r.data.tags.get(TAG_SWEEP) == sweep)]
    evaluated = [r for r in runs if x in r.data.metrics and y in r.data.metrics]
    alike, apart = by_evaluation(evaluated, eval_fingerprint)
    curves, skipped = load_curves(client, alike + [r for r in runs if r not in evaluated], x=x, y=y)
    comparison = compare(curves, at_kl=at_kl, levels=levels, limits=load_limits(client, alike))
    if not comparison.rows:
        raise TrackingError(
            f"no run of experiment {experiment!r} in {uri} has both {x} and {y} logged at the "
            f"same step ({len(runs)} runs looked at)"
        )
    fingerprint = alike[0].data.tags.get(TAG_EVAL_FINGERPRINT) if alike else None
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_frontier(comparison, out_dir / PNG, x=x, y=y, title=f"{experiment}: {y} vs {x}")
    csv_path = write_csv(comparison, out_dir / CSV)
    md = write_markdown(comparison, out_dir / MARKDOWN, experiment=experiment, x=x, y=y)
    run_id = _log(client, exp.experiment_id, sweep_parent(client, exp.experiment_id, sweep) if sweep else None,
                  comparison, (png, csv_path, md), x=x, y=y)
    return ComparisonResult(comparison=comparison, png=png, csv=csv_path, markdown=md, comparison_run_id=run_id,
                            skipped=skipped, fingerprint=fingerprint, evaluated_apart=apart)


def sweep_parent(client: MlflowClient, experiment_id: str, sweep: str) -> str | None:
    found = client.search_runs([experiment_id], max_results=1, filter_string=(
        f"tags.`{TAG_SWEEP}` = '{sweep}' and tags.`{TAG_SWEEP_PARENT}` = 'true'"))
    return found[0].info.run_id if found else None


def _log(client: MlflowClient, experiment_id: str, parent: str | None, comparison: Comparison,
         files: tuple[Path, ...], *, x: str, y: str) -> str:
    """Into the sweep's parent run (artifacts under compare/), else a new run compare-<time>."""
    md = files[-1]
    tags = {"compare.x": x, "compare.y": y}
    note = md.read_text()
    if len(note) <= 5000:  # shown as the run's description in the MLflow UI
        tags["mlflow.note.content"] = note
    if parent is None:
        run_id = client.create_run(experiment_id, run_name=f"compare-{time.strftime('%Y%m%d-%H%M%S')}",
                                   tags=tags | {TAG_COMPARISON: "true"}).info.run_id
    else:
        run_id = parent
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
    try:
        for path in files:
            client.log_artifact(run_id, str(path), None if parent is None else "compare")
        if comparison.matched_kl is not None:
            client.log_metric(run_id, "matched_kl", comparison.matched_kl)
            for method, value in comparison.series_at_matched_kl.items():
                if value is not None:
                    client.log_metric(run_id, f"frontier_at_matched_kl/{slug(method)}", value)
    except BaseException:
        if parent is None:
            client.set_terminated(run_id, status="FAILED")
        raise
    if parent is None:
        client.set_terminated(run_id, status="FINISHED")
    return run_id

"""`prefopt compare` and `prefopt runs`, registered on the main app by `register(app)`.

MLflow is imported inside the commands, so that `prefopt --help` stays fast.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from prefopt.cli_common import fail, resolve, set_opt
from prefopt.tracking.store import (
    TrackingError,
    default_store_dir,
    resolve_tracking_uri,
    slug,
    sqlite_file,
    ui_hint,
)

# Piped output (logs, CI) keeps whole table rows instead of folding them at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)

ExperimentOpt = Annotated[
    str | None,
    typer.Option("--experiment", "-e", help="MLflow experiment [default: tracking.experiment]",
                 show_default=False),
]
UriOpt = Annotated[
    str | None,
    typer.Option("--tracking-uri", help="MLflow URI (default: tracking.uri of the config, "
                 "else $MLFLOW_TRACKING_URI, else runs/mlflow.db)", show_default=False),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="take tracking.uri, tracking.experiment and output_dir from "
                 "this run config", show_default=False),
]
SetOpt = set_opt("Override a config field: --set tracking.experiment=sweep")


def _context(config: Path | None, set_: list[str] | None, tracking_uri: str | None,
             experiment: str | None):
    cfg = resolve(config, set_)
    uri = tracking_uri or resolve_tracking_uri(cfg)
    db = sqlite_file(uri)
    if db is not None and not db.is_file():
        fail(f"no MLflow store at {db} (train a run first, or pass --tracking-uri / --config)")
    # A read command against an unreachable server should fail in seconds, not minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    return cfg, uri, experiment or cfg.tracking.experiment


def compare_cmd(
    experiment: ExperimentOpt = None,
    x: Annotated[str, typer.Option("--x", help="metric on the x axis (lower is better)")] = "eval/kl",
    y: Annotated[str, typer.Option("--y", help="metric on the y axis (higher is better)")] = "eval/reward",
    at_kl: Annotated[
        float | None,
        typer.Option("--at-kl", help="compare rewards at this x [default: the smallest x "
                     "every run reaches]", show_default=False),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="folder for frontier.png, comparison.csv, comparison.md "
                     "[default: runs/compare/<experiment>]", show_default=False),
    ] = None,
    sweep: Annotated[
        str | None,
        typer.Option("--sweep", help="only this sweep's trials (the id `prefopt sweep` prints); the experiment "
                     "is the sweep's", show_default=False),
    ] = None,
    kl_levels: Annotated[
        str | None,
        typer.Option("--kl-levels", help="KLs of the matched-KL table, e.g. 1,2,4 [default: a quarter, a half "
                     "and all of the matched KL]", show_default=False),
    ] = None,
    eval_fingerprint: Annotated[
        str | None,
        typer.Option("--eval-fingerprint", help="compare the runs evaluated this way (tag eval.fingerprint, a "
                     "prefix is enough) [default: the evaluation most runs share]", show_default=False),
    ] = None,
    tracking_uri: UriOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Compare methods: reward-vs-KL frontier per method with error bars and seed bands, the
    matched-KL table with standard errors and differences, logged back to MLflow."""
    from mlflow.exceptions import MlflowException

    from prefopt.storage import is_remote
    from prefopt.tracking.compare import run_comparison, sweep_experiment
    from prefopt.tracking.report import (
        above_lines,
        difference_lines,
        display_rows,
        fmt,
        headers,
        level_headers,
        level_rows,
    )

    cfg, uri, name = _context(config, set_, tracking_uri, experiment)
    if sweep is not None and experiment is None:
        try:
            name = sweep_experiment(uri, sweep)
        except (TrackingError, MlflowException) as exc:
            fail(str(exc))

    # Beside the default store; an output_dir on an object store has none: the working directory.
    out_dir = out or (Path(".") if is_remote(cfg.output_dir) else default_store_dir(cfg.output_dir)) / "compare" / slug(name)
    try:
        with console.status(f"reading runs of {name!r}"):
            levels = None if kl_levels is None else [float(v) for v in kl_levels.split(",") if v.strip()]
            result = run_comparison(uri, name, out_dir=out_dir, x=x, y=y, at_kl=at_kl, sweep=sweep, levels=levels,
                                    eval_fingerprint=eval_fingerprint)
    except ValueError:
        fail(f"--kl-levels {kl_levels}: expected numbers separated by commas, e.g. 1,2,4")
    except (TrackingError, MlflowException) as exc:
        fail(str(exc))
    cmp = result.comparison
    table = Table(title=f"{name}: {y} vs {x}", title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False)
    for i, head in enumerate(headers(cmp, x, y)):
        table.add_column(head, justify="right" if i >= 3 else "left", overflow="fold")
    for cells in display_rows(cmp):
        table.add_row(*cells)
    console.print(table)
    if cmp.matched_kl is not None:
        best = ", ".join(f"{m} {fmt(v)}" for m, v in cmp.series_at_matched_kl.items())
        console.print(f"frontier at {x} = {fmt(cmp.matched_kl)}: {best}", highlight=False)
    if cmp.levels:
        levels_table = Table(title=f"{y} at matched {x}", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for i, head in enumerate(level_headers(cmp, x)):
            levels_table.add_column(head, justify="right" if i else "left")
        for cells in level_rows(cmp):
            levels_table.add_row(*cells)
        console.print(levels_table)
        for text in difference_lines(cmp, x):
            console.print(text, highlight=False)
    for text in above_lines(cmp):
        console.print(f"[red]{text}[/]", highlight=False)
    if result.evaluated_apart:
        apart = "; ".join(f"{fp}: {', '.join(names)}" for fp, names in result.evaluated_apart.items())
        console.print(f"[yellow]{sum(map(len, result.evaluated_apart.values()))} run(s) were evaluated differently "
                      f"(other prompts, sampler, samples per prompt or KL estimator) and are not on this plane: "
                      f"{apart}; compare them with --eval-fingerprint[/]", highlight=False)
    if result.skipped:
        console.print(f"[dim]{len(result.skipped)} run(s) without both {x} and {y} left out: "
                      f"{', '.join(result.skipped)}[/]", highlight=False)
    console.print(f"wrote {result.png}, {result.csv}, {result.markdown}", highlight=False)
    where = f"the sweep's parent run {result.comparison_run_id}" if sweep else f"run {result.comparison_run_id}"
    console.print(f"logged to {where} of {name!r} ({ui_hint(uri)})", highlight=False)


def runs_cmd(
    experiment: ExperimentOpt = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="how many runs")] = 20,
    tracking_uri: UriOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """List the recent runs of an experiment, newest first."""
    from mlflow.exceptions import MlflowException

    from prefopt.tracking.compare import is_comparison, method_of, params_of, search_runs
    from prefopt.tracking.report import fmt
    from prefopt.tracking.store import find_experiment, mlflow_client

    _, uri, name = _context(config, set_, tracking_uri, experiment)
    try:
        client = mlflow_client(uri)
        exp = find_experiment(client, name, uri)
        runs = search_runs(client, exp.experiment_id, max_results=limit)
    except (TrackingError, MlflowException) as exc:
        fail(str(exc))
    # The latest value of each; a column only when some run has logged it.
    metrics = [m for m in ("loss", "eval/reward", "eval/kl", "eval/win_rate")
               if any(m in r.data.metrics for r in runs)]
    table = Table(title=f"runs of {name!r} ({uri})", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for head in ("started", "run", "status", "method", "params"):
        wraps = head in ("run", "params")
        table.add_column(head, overflow="fold", no_wrap=not wraps, min_width=8 if wraps else None)
    for metric in metrics:  # 'eval/win_rate' shows as 'win_rate'
        table.add_column(metric.rsplit("/", 1)[-1], justify="right", no_wrap=True)
    colour = {"FINISHED": "green", "RUNNING": "cyan", "FAILED": "red", "KILLED": "yellow"}
    for run in runs:
        info, values = run.info, run.data.metrics
        started = time.strftime("%m-%d %H:%M", time.localtime(info.start_time / 1000))
        status = f"[{colour.get(info.status, 'white')}]{info.status}[/]"
        method = "compare" if is_comparison(run) else method_of(run)
        table.add_row(started, f"{info.run_name}\n[dim]{info.run_id[:8]}[/]", status, method,
                      params_of(run) or "-", *(fmt(values.get(m)) for m in metrics))
    console.print(table)
    console.print(f"{len(runs)} run(s), newest first; browse them: {ui_hint(uri)}",
                  highlight=False)


def register(app: typer.Typer) -> None:
    app.command("compare")(compare_cmd)
    app.command("runs")(runs_cmd)

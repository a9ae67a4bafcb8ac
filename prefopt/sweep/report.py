"""The end of a sweep on the console: every trial's end, the failed ones in one line each."""

from __future__ import annotations

from rich.table import Table

from prefopt.sweep.runner import SweepResult, concurrency_note
from prefopt.sweep.spec import Sweep


def print_summary(sweep: Sweep, result: SweepResult, console) -> None:
    table = Table(title=f"sweep {sweep.name}")
    for column in ("trial", "end", "seconds", "eval/reward", "eval/kl"):
        table.add_column(column, justify="left" if column in ("trial", "end") else "right")
    for end in result.trials:
        m = end.final_metrics
        shown = {"failed": "[red]failed[/]", "skipped": "finished before",
                 "interrupted": "[yellow]interrupted[/]"}.get(end.status, end.status)
        table.add_row(end.id, shown, f"{end.seconds:.0f}" if end.seconds else "",
                      _fmt(m.get("eval/reward")), _fmt(m.get("eval/kl")))
    console.print(table)
    for end in result.failed:
        console.print(f"[red]failed[/] {end.id}: {end.error}", highlight=False, soft_wrap=True)
    console.print(f"{concurrency_note(result)}; parent MLflow run {result.parent_run_id} "
                  f"(tag {_tag()}={sweep.id})", highlight=False)
    console.print(f"compare the trials: prefopt compare --sweep {sweep.id} --tracking-uri {sweep.tracking_uri}",
                  highlight=False, soft_wrap=True)


def _fmt(value) -> str:
    return "" if value is None else f"{value:.3f}"


def _tag() -> str:
    from prefopt.tracking.tracker import TAG_SWEEP

    return TAG_SWEEP

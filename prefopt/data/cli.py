"""`prefopt data validate CONFIG`: check a data set before renting GPUs.

Runs everything `prepare` runs except writing (read, validate, tokenize with the run's tokenizer,
fingerprint) and prints the report. Exit status: 0 when the run would start, 1 when bad rows
would stop it (data.on_bad_row: error), 2 when the source itself is unusable.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from prefopt.cli_common import ConfigArg, console, fail, guarded, resolve, set_opt
from prefopt.config import RunConfig

SetOpt = set_opt("Override a field: --set data.path=pairs.jsonl (repeatable)")


def register(app: typer.Typer, load_tokenizer: Callable[[RunConfig], Any]) -> None:
    """Add `prefopt data ...` to `app`. The models live above the data, so the caller
    (prefopt.cli) brings `load_tokenizer(cfg)`, the run's tokenizer."""
    data_app = typer.Typer(help="Check preference data.", no_args_is_help=True)

    @data_app.command("validate")
    def validate(
        config: ConfigArg,
        set_: SetOpt = None,
        show: Annotated[int, typer.Option(help="problems to print (all are counted)")] = 20,
    ) -> None:
        """Read, validate and tokenize the run's data; print what would be kept, cut and dropped."""
        cfg = resolve(config, set_)

        def run() -> None:
            with console.status("loading the tokenizer"):
                tokenizer = load_tokenizer(cfg)
            print_report(cfg, tokenizer, show)

        guarded(run, config=cfg)

    app.add_typer(data_app, name="data")


def print_report(cfg: RunConfig, tokenizer: Any, show: int) -> None:
    """Check the run's data with `tokenizer`, print the report, exit 1 or 2 where it would stop."""
    from prefopt.data.errors import DataError
    from prefopt.data.prepare import prepare_parts, progress_bar

    # Parts go to a temporary directory (memory stays a few parts', whatever the corpus size) and
    # are gone at the end: validating writes nothing where the run would look.
    with tempfile.TemporaryDirectory(prefix="prefopt-validate-") as scratch:
        try:
            with progress_bar(console, "reading, validating and tokenizing") as progress:
                prepared = prepare_parts(cfg, tokenizer, Path(scratch), progress)
        except DataError as exc:
            fail(str(exc))
        _print(cfg, tokenizer, prepared, show)


def _print(cfg: RunConfig, tokenizer: Any, prepared, show: int) -> None:
    from prefopt.data.report import describe_reason

    report = prepared.report
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_row("source", report.source)
    table.add_row("format", report.format)
    table.add_row("rows", f"{report.rows_kept} kept of {report.rows_read} read")
    for reason, n in report.dropped.items():
        table.add_row(f"  bad: {reason}", f"{n}  [dim]{describe_reason(reason)}[/]")
    for name, n in report.truncated.items():
        table.add_row(f"  truncated: {name}", f"{n}  [dim]completion cut to data.max_length={cfg.data.max_length}[/]")
    if report.rows_kept:
        table.add_row("fingerprint", prepared.fingerprint(cfg, tokenizer)[:16])
    console.print(table)
    for line in report.problem_lines(show):
        console.print(line, highlight=False, soft_wrap=True)

    if report.problems and cfg.data.on_bad_row == "error":
        console.print(f"[bold red]{len(report.problems)} bad row(s):[/] the run would stop "
                      "(fix them, or set data.on_bad_row=skip to drop them)")
        raise typer.Exit(1)
    if report.rows_kept == 0:
        fail("no usable rows")
    verdict = "ok" if not report.problems else f"ok, {len(report.problems)} bad row(s) would be skipped"
    console.print(f"[bold green]{verdict}[/]")

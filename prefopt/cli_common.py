"""What the CLI modules share: consoles, error exit, config loading and repeated option types.

A leaf: prefopt.cli, prefopt.data.cli and prefopt.tracking.cli import it; it imports none of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from prefopt.config import ConfigError, RunConfig, load_config

console = Console()
err_console = Console(stderr=True)

ConfigArg = Annotated[Path, typer.Argument(help="YAML run config", show_default=False)]


def set_opt(help_text: str) -> Any:
    """The repeatable `--set` option; each command's help shows an override that fits it."""
    return Annotated[list[str] | None, typer.Option("--set", help=help_text, show_default=False)]


SetOpt = set_opt("Override a field: --set train.lr=1e-4 (repeatable)")


def fail(message: str, code: int = 2) -> NoReturn:
    """Print a user-facing error without a traceback and exit."""
    for line in message.splitlines():
        err_console.print(f"[bold red]error:[/] {line}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def resolve(config: Path | None, overrides: list[str] | None) -> RunConfig:
    try:
        return load_config(config, overrides or [])
    except ConfigError as exc:
        fail(str(exc))

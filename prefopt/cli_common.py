"""What the CLI modules share: consoles, error exit, config loading and repeated option types.

A leaf: prefopt.cli, prefopt.data.cli and prefopt.tracking.cli import it; it imports none of them.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console

from prefopt.config import ConfigError, RunConfig, load_config
from prefopt.errors import BUG, CONFIG_OR_INPUT, INTERRUPTED, UserError

T = TypeVar("T")
# --debug (or PREFOPT_DEBUG=1): tracebacks for every error, user errors included.
DEBUG = {"on": os.environ.get("PREFOPT_DEBUG", "") not in ("", "0")}

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


def guarded(action: Callable[[], T], *, log_dir: str | Path | None = None) -> T:
    """Run a command's work. A user error (prefopt.errors.UserError) ends in its message and
    exit code; anything else is a bug: one line on the console, the traceback in
    `<log_dir>/prefopt-error.log` (or on the console with --debug)."""
    try:
        return action()
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        fail("interrupted", INTERRUPTED)
    except (UserError, FileNotFoundError) as exc:
        if DEBUG["on"]:
            traceback.print_exc()
        fail(str(exc), getattr(exc, "exit_code", CONFIG_OR_INPUT))
    except Exception as exc:
        if DEBUG["on"]:
            raise
        where = _save_traceback(log_dir)
        first = (str(exc).strip().splitlines() or [""])[0]
        fail(f"internal error, a bug: {type(exc).__name__}: {first}; the traceback is in {where} "
             "(or rerun with --debug); please report it", BUG)


def _save_traceback(log_dir: str | Path | None) -> str:
    try:
        from prefopt.storage import is_remote

        path = Path(log_dir if log_dir and not is_remote(log_dir) else ".") / "prefopt-error.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(traceback.format_exc())
        return str(path)
    except OSError:
        return "(could not be written)"

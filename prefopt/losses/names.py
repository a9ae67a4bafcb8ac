"""The losses' names, parameters, defaults and ranges, and what each loss needs; no torch.

The one place these live. The config validates a run against it at load time, the tracker
tags runs from it, and `prefopt.losses.registry` pairs each name with its function. Importing
this module imports nothing of the loss mathematics, so the config and the CLI stay light.
"""

from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LossSpec:
    defaults: dict[str, Any]  # every parameter the loss takes, with its default
    reference: bool  # needs ref log-probs
    lengths: bool  # needs chosen_lengths and rejected_lengths
    rejected: bool = True  # reads the rejected completion (False: sft, which trains on chosen only)


def _pairwise(*, ref: bool, lengths: bool, **defaults: Any) -> LossSpec:
    # Every pairwise loss takes sft_weight: the chosen completion's mean NLL (RPO = dpo + it).
    return LossSpec({**defaults, "sft_weight": defaults.get("sft_weight", 0.0)}, ref, lengths)


# f of the GPO family (arXiv 2402.05749, Sec. 2) and what a pair compares: summed or per-token
# log-ratio to the reference, or the policy's own summed or per-token log-prob (no reference).
GPO_FUNCTION_NAMES = ("logistic", "hinge", "squared", "exponential", "truncated_squared", "savage")
GPO_SCORES = ("sum_logratio", "avg_logratio", "sum_logp", "avg_logp")
REFERENCE_SCORES = ("sum_logratio", "avg_logratio")

# Reference-free losses need lengths too: their rewards metric is β·π/L (SimPO, arXiv 2405.14734).
PAIRWISE = {
    "dpo": _pairwise(ref=True, lengths=False, beta=0.1, label_smoothing=0.0),
    "robust": _pairwise(ref=True, lengths=False, beta=0.1, label_smoothing=0.1),
    "hinge": _pairwise(ref=True, lengths=False, beta=0.1),
    "ipo": _pairwise(ref=True, lengths=True, beta=0.1),
    "nca_pair": _pairwise(ref=True, lengths=False, beta=0.1),
    "bco_pair": _pairwise(ref=True, lengths=False, beta=0.1),
    "sppo_hard": _pairwise(ref=True, lengths=False, beta=0.1),
    "apo_zero": _pairwise(ref=True, lengths=False, beta=0.1),
    "apo_down": _pairwise(ref=True, lengths=False, beta=0.1),
    "discopop": _pairwise(ref=True, lengths=False, beta=0.1, tau=0.05),
    "simpo": _pairwise(ref=False, lengths=True, beta=2.0, gamma=1.0),
    "cpo": _pairwise(ref=False, lengths=True, beta=0.1, sft_weight=1.0),
    "orpo": _pairwise(ref=False, lengths=True, beta=0.1),
    # needs depend on `score`: see _needs.
    "gpo": _pairwise(ref=True, lengths=False, beta=0.1, function="logistic",
                     score="sum_logratio", gamma=0.0),
    # SFT is a loss like the others: the chosen completion's mean token NLL, no reference, and
    # no rejected sequence at all, so callers skip its forward pass (needs_rejected).
    "sft": LossSpec({}, reference=False, lengths=True, rejected=False),
}
UNPAIRED = {
    "kto": LossSpec({"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
                    reference=True, lengths=False),
}
# The reward model's loss: on scalar rewards, not on a policy's log-probs.
REWARD = {
    "reward_model": LossSpec({"margin": 0.0, "center_weight": 0.0}, reference=False, lengths=False),
}

PAIRWISE_LOSSES = tuple(PAIRWISE)
UNPAIRED_LOSSES = tuple(UNPAIRED)
REWARD_LOSSES = tuple(REWARD)
# Every loss name, the one list the config and the CLI read.
LOSSES = PAIRWISE_LOSSES + UNPAIRED_LOSSES + REWARD_LOSSES

# What each parameter may be: (test, description for the error message).
_NUMBER_RULES = {
    "beta": (lambda v: v > 0, "> 0"),
    "label_smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    "gamma": (lambda v: True, "a finite number"),
    "tau": (lambda v: v > 0, "> 0"),
    "sft_weight": (lambda v: v >= 0, ">= 0"),
    "desirable_weight": (lambda v: v > 0, "> 0"),
    "margin": (lambda v: v >= 0, ">= 0"),
    "center_weight": (lambda v: v >= 0, ">= 0"),
    "undesirable_weight": (lambda v: v > 0, "> 0"),
}
_CHOICES = {"function": GPO_FUNCTION_NAMES, "score": GPO_SCORES}

# The range of (w_d·n_d)/(w_u·n_u) outside which kto_weight_warning speaks: the KTO paper
# (arXiv 2402.01306) advises weighting desirable and undesirable examples so that the
# desirable side weighs as much as the undesirable one, or somewhat more.
KTO_RATIO_RANGE = (1.0, 1.5)


def spec(name: str) -> LossSpec:
    """The declaration of loss `name`; an unknown name is a ValueError that lists the known."""
    found = PAIRWISE.get(name) or UNPAIRED.get(name) or REWARD.get(name)
    if found is None:
        close = difflib.get_close_matches(str(name), LOSSES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown loss {name!r}{hint} (known: {', '.join(LOSSES)})")
    return found


def default_params(name: str) -> dict[str, Any]:
    """Every parameter `name` takes, with its default (a fresh dict)."""
    return dict(spec(name).defaults)


def resolve_params(name: str, **params: Any) -> dict[str, Any]:
    """The defaults of `name` overridden by `params`, checked. None means "the default".

    A parameter the loss does not take is an error (a typo must not be silently ignored),
    and so is a value out of range.
    """
    declared = spec(name)
    given = {k: v for k, v in params.items() if v is not None}
    unknown = sorted(set(given) - set(declared.defaults))
    if unknown:
        named = []
        for key in unknown:
            close = difflib.get_close_matches(key, declared.defaults, n=1)
            users = [n for n, s in {**PAIRWISE, **UNPAIRED, **REWARD}.items() if key in s.defaults]
            if close:
                named.append(f"{key!r} (did you mean {close[0]!r}?)")
            elif users:
                named.append(f"{key!r} (a parameter of {', '.join(users)})")
            else:
                named.append(repr(key))
        raise ValueError(
            f"loss {name!r} does not take parameter {', '.join(named)}; "
            + (f"its parameters are: {', '.join(declared.defaults)}" if declared.defaults else "it takes none")
        )
    resolved = {**declared.defaults, **given}
    for key, value in resolved.items():
        if key in _CHOICES:
            if value not in _CHOICES[key]:
                raise ValueError(
                    f"loss {name!r}: {key}={value!r} is not one of {', '.join(_CHOICES[key])}"
                )
            continue
        ok, rule = _NUMBER_RULES[key]
        is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not (is_number and math.isfinite(value) and ok(value)):
            raise ValueError(f"loss {name!r}: {key} must be {rule} (got {value!r})")
        resolved[key] = float(value)
    return resolved


def needs(name: str, params: dict[str, Any]) -> tuple[bool, bool]:
    """(needs reference log-probs, needs lengths) for resolved params."""
    declared = spec(name)
    reference, lengths = declared.reference, declared.lengths
    if name == "gpo":
        reference = params["score"] in REFERENCE_SCORES
        # Per-token scores divide by L; reference-free rewards are β·π/L.
        lengths = params["score"] != "sum_logratio"
    if params.get("sft_weight", 0.0) > 0:
        lengths = True
    return reference, lengths


def needs_reference(name: str, **params: Any) -> bool:
    """Whether the loss `name` with `params` reads reference log-probs. False: training needs no
    reference (evaluation on a task may still start one, to measure KL: docs/losses.md)."""
    return needs(name, resolve_params(name, **params))[0]


def needs_rejected(name: str) -> bool:
    """Whether `name` reads the rejected completion of a pair (False: sft)."""
    return spec(name).rejected


def is_unpaired(name: str) -> bool:
    """Whether `name` trains on unpaired, labelled completions (kto) rather than pairs."""
    spec(name)  # an unknown name is an error, not False
    return name in UNPAIRED


def needs_lengths(name: str, **params: Any) -> bool:
    """Whether `name` with `params` needs chosen_lengths and rejected_lengths (token counts)."""
    return needs(name, resolve_params(name, **params))[1]

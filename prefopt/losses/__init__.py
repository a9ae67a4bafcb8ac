"""Preference losses: pure functions over per-sequence log-probs; no model, no IO.

    out = pairwise_loss("dpo", policy_chosen_logps=pc, policy_rejected_logps=pr,
                        ref_chosen_logps=rc, ref_rejected_logps=rr, beta=0.1)
    out.loss.backward(); log(out.metrics)

Formulas, defaults and papers: docs/losses.md. Before building workers, ask
needs_reference(name, **params) (False: the loss reads no reference log-probs) and
needs_lengths(name, **params).

Two halves: `prefopt.losses.names` declares the names, parameters, ranges and needs (no torch:
the config and the tracker read only it); the rest is the mathematics, in torch. Importing this
package loads the torch half only when one of its names is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from prefopt.losses.names import (
    GPO_FUNCTION_NAMES,
    GPO_SCORES,
    KTO_RATIO_RANGE,
    LOSSES,
    PAIRWISE_LOSSES,
    REWARD_LOSSES,
    UNPAIRED_LOSSES,
    default_params,
    is_unpaired,
    needs_lengths,
    needs_reference,
    needs_rejected,
    resolve_params,
)

# The torch half: name -> the module that defines it, imported on first use (PEP 562).
_LAZY = {
    "kto_weight_warning": "kto",
    "GPO_FUNCTIONS": "pairwise", "log1mexp": "pairwise",
    **{name: "ppo" for name in (
        "KL_ESTIMATORS", "AdaptiveKLController", "FixedKLController", "clipped_policy_loss",
        "clipped_value_loss", "explained_variance", "gae", "grpo_advantages", "kl_controller",
        "kl_penalty", "rloo_advantages", "sequence_to_tokens", "shape_rewards", "whiten")},
    **{name: "registry" for name in ("LossOutput", "pairwise_loss", "reward_loss", "unpaired_loss")},
}

if TYPE_CHECKING:  # what the lazy names are, for readers and type checkers
    from prefopt.losses.kto import kto_weight_warning
    from prefopt.losses.pairwise import GPO_FUNCTIONS, log1mexp
    from prefopt.losses.ppo import (
        KL_ESTIMATORS,
        AdaptiveKLController,
        FixedKLController,
        clipped_policy_loss,
        clipped_value_loss,
        explained_variance,
        gae,
        grpo_advantages,
        kl_controller,
        kl_penalty,
        rloo_advantages,
        sequence_to_tokens,
        shape_rewards,
        whiten,
    )
    from prefopt.losses.registry import LossOutput, pairwise_loss, reward_loss, unpaired_loss


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value  # once loaded, an ordinary attribute
    return value


__all__ = [
    "GPO_FUNCTIONS",
    "GPO_FUNCTION_NAMES",
    "GPO_SCORES",
    "KL_ESTIMATORS",
    "KTO_RATIO_RANGE",
    "LOSSES",
    "PAIRWISE_LOSSES",
    "REWARD_LOSSES",
    "UNPAIRED_LOSSES",
    "AdaptiveKLController",
    "FixedKLController",
    "LossOutput",
    "clipped_policy_loss",
    "clipped_value_loss",
    "default_params",
    "explained_variance",
    "gae",
    "grpo_advantages",
    "is_unpaired",
    "kl_controller",
    "kl_penalty",
    "kto_weight_warning",
    "log1mexp",
    "needs_lengths",
    "needs_reference",
    "needs_rejected",
    "pairwise_loss",
    "resolve_params",
    "reward_loss",
    "rloo_advantages",
    "sequence_to_tokens",
    "shape_rewards",
    "unpaired_loss",
    "whiten",
]

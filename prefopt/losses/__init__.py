"""Preference losses: pure functions over per-sequence log-probs; no model, no IO.

    out = pairwise_loss("dpo", policy_chosen_logps=pc, policy_rejected_logps=pr,
                        ref_chosen_logps=rc, ref_rejected_logps=rr, beta=0.1)
    out.loss.backward(); log(out.metrics)

Formulas, defaults and papers: docs/losses.md (from REFERENCES.md). Before building workers,
ask needs_reference(name, **params) (False: no reference server at all) and
needs_lengths(name, **params).
"""

from prefopt.losses.kto import KTO_RATIO_RANGE, kto_weight_warning
from prefopt.losses.pairwise import GPO_FUNCTIONS, GPO_SCORES, log1mexp
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
from prefopt.losses.registry import (
    LOSSES,
    PAIRWISE_LOSSES,
    REWARD_LOSSES,
    UNPAIRED_LOSSES,
    LossOutput,
    default_params,
    is_unpaired,
    needs_lengths,
    needs_reference,
    needs_rejected,
    pairwise_loss,
    resolve_params,
    reward_loss,
    unpaired_loss,
)

__all__ = [
    "GPO_FUNCTIONS",
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

"""KTO (arXiv 2402.01306): a loss for unpaired data, each completion labelled good or bad.

ρ = π − r is the policy/reference log-ratio of one completion (summed log-probs, nats).
"""

from __future__ import annotations

import torch
from torch import Tensor

from prefopt.losses.names import KTO_RATIO_RANGE


def kto(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl_policy_logps: Tensor,
    kl_ref_logps: Tensor,
    *,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> tuple[Tensor, Tensor]:
    """Per-example KTO loss [B] and the reference point z (a detached scalar).

    policy_logps, ref_logps: [B]; desirable: [B] bool. kl_policy_logps, kl_ref_logps: [K],
    log-probs of mismatched (prompt, completion) pairs, whose mean log-ratio estimates
    KL(π‖π_ref) without a second sampling pass.
    """
    # z is KTO's reference point: max(0, estimated KL), detached so that the policy cannot
    # lower its loss by moving the estimate; it only shifts where ρ counts as a gain.
    z = (kl_policy_logps - kl_ref_logps).mean().clamp(min=0.0).detach()
    rho = policy_logps - ref_logps
    # KTO loss, arXiv 2402.01306: w_d·(1 − σ(β(ρ − z))) and w_u·(1 − σ(β(z − ρ))).
    # 1 − σ(x) is written σ(−x), which keeps its precision when σ(x) rounds to 1.
    desirable_loss = desirable_weight * torch.sigmoid(beta * (z - rho))
    undesirable_loss = undesirable_weight * torch.sigmoid(beta * (rho - z))
    return torch.where(desirable, desirable_loss, undesirable_loss), z


def kto_weight_warning(
    n_desirable: int,
    n_undesirable: int,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> str | None:
    """A warning when (w_d·n_d)/(w_u·n_u) lies outside [1, 3/2], else None.

    Call once on the whole training set (counts of desirable and undesirable examples),
    not per batch: a micro-batch's counts say nothing about the balance of the data.
    """
    if n_desirable < 0 or n_undesirable < 0 or n_desirable + n_undesirable == 0:
        raise ValueError(
            f"kto_weight_warning: need non-negative counts, not both 0 "
            f"(got n_desirable={n_desirable}, n_undesirable={n_undesirable})"
        )
    if desirable_weight <= 0 or undesirable_weight <= 0:
        raise ValueError(
            f"kto_weight_warning: weights must be > 0 (got desirable_weight={desirable_weight}, "
            f"undesirable_weight={undesirable_weight})"
        )
    if n_desirable == 0 or n_undesirable == 0:
        missing = "desirable" if n_desirable == 0 else "undesirable"
        return (
            f"KTO data has no {missing} examples (n_desirable={n_desirable}, "
            f"n_undesirable={n_undesirable}); KTO learns from both kinds of label"
        )
    lo, hi = KTO_RATIO_RANGE
    ratio = (desirable_weight * n_desirable) / (undesirable_weight * n_undesirable)
    if lo <= ratio <= hi:
        return None
    # Either weight alone can bring the ratio into range: the weight that makes it exactly 1,
    # scaled to each end of the range.
    even_d = undesirable_weight * n_undesirable / n_desirable
    even_u = desirable_weight * n_desirable / n_undesirable
    return (
        f"KTO weights: (desirable_weight*n_desirable)/(undesirable_weight*n_undesirable) = "
        f"({desirable_weight:g}*{n_desirable})/({undesirable_weight:g}*{n_undesirable}) = "
        f"{ratio:.3g}, outside the recommended [{lo:g}, {hi:g}]; set desirable_weight in "
        f"[{lo * even_d:.3g}, {hi * even_d:.3g}] or undesirable_weight in "
        f"[{even_u / hi:.3g}, {even_u / lo:.3g}] (not both)"
    )

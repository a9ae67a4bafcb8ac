"""The table of losses and the two entry points, `pairwise_loss` and `unpaired_loss`.

The entry points check what they are given (parameter names and values, whether the loss
has the reference log-probs and lengths it needs, tensor shapes, finiteness), upcast to
fp32, run the loss and compute the metrics users know from TRL (its DPOTrainer's `rewards/...`,
`logps/...`). Names, parameters and ranges are declared in `prefopt.losses.names`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from prefopt.losses import names, pairwise
from prefopt.losses.kto import kto
from prefopt.losses.names import (
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
from prefopt.losses.pairwise import Pairs
from prefopt.losses.reward import bradley_terry

__all__ = [  # the names and ranges are re-exported: prefopt.losses offers both halves
    "LOSSES", "PAIRWISE_LOSSES", "REWARD_LOSSES", "UNPAIRED_LOSSES", "LossOutput", "default_params",
    "is_unpaired", "needs_lengths", "needs_reference", "needs_rejected", "pairwise_loss",
    "resolve_params", "reward_loss", "unpaired_loss",
]


class LossOutput(NamedTuple):
    loss: Tensor  # scalar, mean of per_example; backward() from here
    per_example: Tensor  # [B], fp32
    metrics: dict[str, float]  # detached python floats, TRL's names


# Each name of prefopt.losses.names with its function; names.py declares what each takes and needs.
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "dpo": pairwise.dpo, "robust": pairwise.robust, "hinge": pairwise.hinge, "ipo": pairwise.ipo,
    "nca_pair": pairwise.nca_pair, "bco_pair": pairwise.bco_pair, "sppo_hard": pairwise.sppo_hard,
    "apo_zero": pairwise.apo_zero, "apo_down": pairwise.apo_down, "discopop": pairwise.discopop,
    "simpo": pairwise.simpo, "cpo": pairwise.cpo, "orpo": pairwise.orpo, "gpo": pairwise.gpo,
    "sft": pairwise.sft, "kto": kto, "reward_model": bradley_terry,
}
if set(_FUNCTIONS) != set(LOSSES) or set(pairwise.GPO_FUNCTIONS) != set(names.GPO_FUNCTION_NAMES):
    raise RuntimeError("prefopt.losses: the functions and prefopt.losses.names disagree on the loss names")


# ---------------------------------------------------------------------------- tensors


def _logps(arg: str, t: Any, like: Tensor | None) -> Tensor:
    """Check a log-prob tensor, move it to `like`'s device, upcast bf16/fp16 to fp32."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor of shape [B], got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{arg} must be a floating-point tensor (log-probs), got {t.dtype}")
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{arg} must have shape [B] with B >= 1, got {list(t.shape)}")
    if like is not None and t.shape != like.shape:
        raise ValueError(f"{arg} has shape {list(t.shape)}, expected {list(like.shape)}")
    if like is not None:
        t = t.to(like.device)  # cached reference log-probs arrive on the CPU
    if not torch.isfinite(t).all():
        bad = torch.nonzero(~torch.isfinite(t)).flatten()[:5].tolist()
        raise ValueError(f"{arg} has non-finite values (NaN or inf) at rows {bad}")
    # Half precision has 8 (bf16) or 11 (fp16) bits of mantissa: differences of summed
    # log-probs in the hundreds would lose whole nats. All arithmetic happens in fp32.
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def _lengths(arg: str, t: Any, like: Tensor) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor of shape [B], got {type(t).__name__}")
    if t.shape != like.shape:
        raise ValueError(f"{arg} has shape {list(t.shape)}, expected {list(like.shape)}")
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{arg} must hold token counts (integers), got {t.dtype}")
    t = t.to(device=like.device, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
    if not (t >= 1).all():  # also catches NaN
        bad = torch.nonzero(~(t >= 1)).flatten()[:5].tolist()
        raise ValueError(f"{arg} must be >= 1 (completion token counts); bad rows {bad}")
    return t


def _missing(name: str, what: str, **given: Any) -> None:
    missing = [arg for arg, value in given.items() if value is None]
    if missing:
        raise ValueError(f"loss {name!r} needs {what}: pass {', '.join(missing)}")


def _to_floats(values: dict[str, Tensor]) -> dict[str, float]:
    # One device-to-host copy for all metrics, instead of one sync per .item().
    numbers = torch.stack([v.detach().double() for v in values.values()]).tolist()
    return dict(zip(values, numbers, strict=True))


# ---------------------------------------------------------------------- entry points


def pairwise_loss(
    name: str,
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor | None = None,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    **params: Any,
) -> LossOutput:
    """Run pairwise loss `name` on a batch of B pairs.

    Log-probs are [B], summed over completion tokens (any float dtype; computed in fp32);
    lengths are [B] completion token counts. Reference log-probs are ignored by
    reference-free losses. `params`: the loss's parameters (see default_params(name)).
    sft reads only the chosen side: policy_rejected_logps and rejected_lengths may be None.
    """
    if name in names.UNPAIRED:
        raise ValueError(f"loss {name!r} is unpaired: call unpaired_loss, not pairwise_loss")
    params = resolve_params(name, **params)
    reference, lengths = names.needs(name, params)
    spec = names.PAIRWISE[name]
    fn = _FUNCTIONS[name]

    chosen = _logps("policy_chosen_logps", policy_chosen_logps, None)
    if not spec.rejected:
        _missing(name, "completion lengths", chosen_lengths=chosen_lengths)
        p = Pairs(chosen, chosen, None, None, _lengths("chosen_lengths", chosen_lengths, chosen), None)
        per_example = fn(p)  # [B]
        loss = per_example.mean()
        values = {"loss": loss, "logps/chosen": p.chosen.detach().mean(), "nll": per_example.detach().mean()}
        return LossOutput(loss, per_example, _to_floats(values))
    rejected = _logps("policy_rejected_logps", policy_rejected_logps, chosen)
    ref_c = ref_r = len_c = len_r = None
    if reference:
        _missing(name, "reference log-probs", ref_chosen_logps=ref_chosen_logps,
                 ref_rejected_logps=ref_rejected_logps)
        ref_c = _logps("ref_chosen_logps", ref_chosen_logps, chosen)
        ref_r = _logps("ref_rejected_logps", ref_rejected_logps, chosen)
    if lengths:
        why = "completion lengths"
        if params["sft_weight"] > 0:
            why += " (sft_weight > 0 adds the mean token NLL −πc/Lc)"
        _missing(name, why, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
        len_c = _lengths("chosen_lengths", chosen_lengths, chosen)
        len_r = _lengths("rejected_lengths", rejected_lengths, chosen)
    p = Pairs(chosen, rejected, ref_c, ref_r, len_c, len_r)

    sft_weight = params.pop("sft_weight")
    per_example = fn(p, **params)  # [B]
    if sft_weight > 0:
        # RPO (arXiv 2404.19733) adds the chosen mean token NLL; for cpo this is its α term.
        per_example = per_example + sft_weight * pairwise.mean_nll(p)
    loss = per_example.mean()

    with torch.no_grad():
        beta = params["beta"]
        if reference:
            reward_c, reward_r = (beta * rho for rho in pairwise.logratios(p))
        else:
            reward_c = beta * p.chosen / p.chosen_lengths
            reward_r = beta * p.rejected / p.rejected_lengths
        values = {
            "loss": loss,
            "rewards/chosen": reward_c.mean(),
            "rewards/rejected": reward_r.mean(),
            "rewards/margins": (reward_c - reward_r).mean(),
            "rewards/accuracies": (reward_c > reward_r).float().mean(),
            "logps/chosen": p.chosen.mean(),
            "logps/rejected": p.rejected.mean(),
        }
        if sft_weight > 0 or name == "orpo":
            values["nll"] = pairwise.mean_nll(p).mean()
    return LossOutput(loss, per_example, _to_floats(values))


def unpaired_loss(
    name: str,
    *,
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl_policy_logps: Tensor,
    kl_ref_logps: Tensor,
    lengths: Tensor | None = None,
    **params: Any,
) -> LossOutput:
    """Run unpaired loss `name` (kto) on B labelled completions.

    policy_logps, ref_logps: [B] summed log-probs; desirable: [B] bool. kl_policy_logps,
    kl_ref_logps: [K] log-probs of mismatched pairs (completion j with prompt i ≠ j), e.g.
    the micro-batch's completions rotated by one; gather them across ranks first for a
    less noisy KL estimate. lengths: [B] token counts, unused by kto.

    Metrics: rewards/chosen and logps/chosen average the desirable examples, .../rejected
    the undesirable ones; a key is absent when the batch has no example of that kind.
    """
    if name in names.PAIRWISE:
        raise ValueError(f"loss {name!r} is pairwise: call pairwise_loss, not unpaired_loss")
    params = resolve_params(name, **params)
    _missing(name, "reference log-probs", ref_logps=ref_logps)
    _missing(name, "log-probs of mismatched pairs for its KL estimate",
             kl_policy_logps=kl_policy_logps, kl_ref_logps=kl_ref_logps)

    policy = _logps("policy_logps", policy_logps, None)
    ref = _logps("ref_logps", ref_logps, policy)
    kl_policy = _logps("kl_policy_logps", kl_policy_logps, None).to(policy.device)
    kl_ref = _logps("kl_ref_logps", kl_ref_logps, kl_policy)
    if not isinstance(desirable, Tensor) or desirable.dtype != torch.bool or desirable.shape != policy.shape:
        got = f"{desirable.dtype} {list(desirable.shape)}" if isinstance(desirable, Tensor) else type(desirable).__name__
        raise TypeError(f"desirable must be a bool tensor of shape {list(policy.shape)}, got {got}")
    desirable = desirable.to(policy.device)
    # `lengths` is unused: kto compares summed log-probs. It is accepted so that every
    # unpaired loss has one signature (docs/losses.md).

    per_example, z = _FUNCTIONS[name](policy, ref, desirable, kl_policy, kl_ref, **params)
    loss = per_example.mean()

    with torch.no_grad():
        reward = params["beta"] * (policy - ref)
        values = {"loss": loss, "kl": z}
        # Empty groups are left out rather than logged as NaN; a sync, but metrics need one.
        n_desirable = int(desirable.sum())
        if n_desirable > 0:
            values["rewards/chosen"] = reward[desirable].mean()
            values["logps/chosen"] = policy[desirable].mean()
        if n_desirable < desirable.numel():
            values["rewards/rejected"] = reward[~desirable].mean()
            values["logps/rejected"] = policy[~desirable].mean()
        if 0 < n_desirable < desirable.numel():
            values["rewards/margins"] = values["rewards/chosen"] - values["rewards/rejected"]
    return LossOutput(loss, per_example, _to_floats(values))


def reward_loss(name: str, *, chosen_rewards: Tensor, rejected_rewards: Tensor, **params: Any) -> LossOutput:
    """Run reward-model loss `name` on B pairs of scalar rewards [B] (any float dtype; fp32 math).

    Metrics: loss, rm/accuracy (share of pairs with r_c > r_r, a tie counting one half, as
    eval/win_rate counts it: a fresh head that scores every pair alike is at chance, 0.5, not 0),
    rm/margin (mean r_c − r_r),
    rewards/chosen, rewards/rejected (mean rewards)."""
    if name not in REWARD_LOSSES:
        raise ValueError(f"loss {name!r} is not a reward-model loss (known: {', '.join(REWARD_LOSSES)})")
    params = resolve_params(name, **params)
    chosen = _logps("chosen_rewards", chosen_rewards, None)
    rejected = _logps("rejected_rewards", rejected_rewards, chosen)
    per_example = _FUNCTIONS[name](chosen, rejected, **params)
    loss = per_example.mean()
    with torch.no_grad():
        wins = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
        values = {"loss": loss, "rm/accuracy": wins.mean(),
                  "rm/margin": (chosen - rejected).mean(), "rewards/chosen": chosen.mean(),
                  "rewards/rejected": rejected.mean()}
    return LossOutput(loss, per_example, _to_floats(values))

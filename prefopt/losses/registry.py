"""The table of losses and the two entry points, `pairwise_loss` and `unpaired_loss`.

The entry points check what they are given (parameter names and values, whether the loss
has the reference log-probs and lengths it needs, tensor shapes, finiteness), upcast to
fp32, run the loss and compute the metrics users know from TRL (REFERENCES.md).
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from prefopt.losses import pairwise
from prefopt.losses.kto import kto
from prefopt.losses.pairwise import GPO_FUNCTIONS, GPO_SCORES, REFERENCE_SCORES, Pairs
from prefopt.losses.reward import bradley_terry


class LossOutput(NamedTuple):
    loss: Tensor  # scalar, mean of per_example; backward() from here
    per_example: Tensor  # [B], fp32
    metrics: dict[str, float]  # detached python floats, TRL's names


@dataclass(frozen=True)
class _Loss:
    fn: Callable[..., Tensor]
    defaults: dict[str, Any]  # every parameter the loss takes, with its default
    reference: bool  # needs ref log-probs
    lengths: bool  # needs chosen_lengths and rejected_lengths
    rejected: bool = True  # reads the rejected completion (False: sft, which trains on chosen only)


def _pairwise(fn, *, ref: bool, lengths: bool, **defaults) -> _Loss:
    # Every pairwise loss takes sft_weight: the chosen completion's mean NLL (RPO = dpo + it).
    return _Loss(fn, {**defaults, "sft_weight": defaults.get("sft_weight", 0.0)}, ref, lengths)


# Reference-free losses need lengths too: their rewards metric is β·π/L (REFERENCES.md).
_PAIRWISE = {
    "dpo": _pairwise(pairwise.dpo, ref=True, lengths=False, beta=0.1, label_smoothing=0.0),
    "robust": _pairwise(pairwise.robust, ref=True, lengths=False, beta=0.1, label_smoothing=0.1),
    "hinge": _pairwise(pairwise.hinge, ref=True, lengths=False, beta=0.1),
    "ipo": _pairwise(pairwise.ipo, ref=True, lengths=True, beta=0.1),
    "nca_pair": _pairwise(pairwise.nca_pair, ref=True, lengths=False, beta=0.1),
    "bco_pair": _pairwise(pairwise.bco_pair, ref=True, lengths=False, beta=0.1),
    "sppo_hard": _pairwise(pairwise.sppo_hard, ref=True, lengths=False, beta=0.1),
    "apo_zero": _pairwise(pairwise.apo_zero, ref=True, lengths=False, beta=0.1),
    "apo_down": _pairwise(pairwise.apo_down, ref=True, lengths=False, beta=0.1),
    "discopop": _pairwise(pairwise.discopop, ref=True, lengths=False, beta=0.1, tau=0.05),
    "simpo": _pairwise(pairwise.simpo, ref=False, lengths=True, beta=2.0, gamma=1.0),
    "cpo": _pairwise(pairwise.cpo, ref=False, lengths=True, beta=0.1, sft_weight=1.0),
    "orpo": _pairwise(pairwise.orpo, ref=False, lengths=True, beta=0.1),
    # needs depend on `score`: see _needs.
    "gpo": _pairwise(pairwise.gpo, ref=True, lengths=False, beta=0.1, function="logistic",
                     score="sum_logratio", gamma=0.0),
}
# SFT is a loss like the others: the chosen completion's mean token NLL, no reference, and no
# rejected sequence at all, so callers skip its forward pass (needs_rejected).
_PAIRWISE["sft"] = _Loss(pairwise.sft, {}, reference=False, lengths=True, rejected=False)
_UNPAIRED = {
    "kto": _Loss(kto, {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
                 reference=True, lengths=False),
}

# The reward model's loss: on scalar rewards, not on a policy's log-probs.
_REWARD = {
    "reward_model": _Loss(bradley_terry, {"margin": 0.0, "center_weight": 0.0}, reference=False, lengths=False),
}

PAIRWISE_LOSSES = tuple(_PAIRWISE)
UNPAIRED_LOSSES = tuple(_UNPAIRED)
REWARD_LOSSES = tuple(_REWARD)
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
_CHOICES = {"function": tuple(GPO_FUNCTIONS), "score": GPO_SCORES}


# ------------------------------------------------------------------------ parameters


def _spec(name: str) -> _Loss:
    spec = _PAIRWISE.get(name) or _UNPAIRED.get(name) or _REWARD.get(name)
    if spec is None:
        known = LOSSES
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown loss {name!r}{hint} (known: {', '.join(known)})")
    return spec


def default_params(name: str) -> dict[str, Any]:
    """Every parameter `name` takes, with its default (a fresh dict)."""
    return dict(_spec(name).defaults)


def resolve_params(name: str, **params: Any) -> dict[str, Any]:
    """The defaults of `name` overridden by `params`, checked. None means "the default".

    A parameter the loss does not take is an error (a typo must not be silently ignored),
    and so is a value out of range.
    """
    spec = _spec(name)
    given = {k: v for k, v in params.items() if v is not None}
    unknown = sorted(set(given) - set(spec.defaults))
    if unknown:
        named = []
        for key in unknown:
            close = difflib.get_close_matches(key, spec.defaults, n=1)
            users = [n for n, s in {**_PAIRWISE, **_UNPAIRED, **_REWARD}.items() if key in s.defaults]
            if close:
                named.append(f"{key!r} (did you mean {close[0]!r}?)")
            elif users:
                named.append(f"{key!r} (a parameter of {', '.join(users)})")
            else:
                named.append(repr(key))
        raise ValueError(
            f"loss {name!r} does not take parameter {', '.join(named)}; "
            f"its parameters are: {', '.join(spec.defaults)}"
        )
    resolved = {**spec.defaults, **given}
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


def _needs(name: str, params: dict[str, Any]) -> tuple[bool, bool]:
    """(needs reference log-probs, needs lengths) for resolved params."""
    spec = _spec(name)
    reference, lengths = spec.reference, spec.lengths
    if name == "gpo":
        reference = params["score"] in REFERENCE_SCORES
        # Per-token scores divide by L; reference-free rewards are β·π/L.
        lengths = params["score"] != "sum_logratio"
    if params.get("sft_weight", 0.0) > 0:
        lengths = True
    return reference, lengths


def needs_reference(name: str, **params: Any) -> bool:
    """Whether `name` with `params` needs reference log-probs; False: skip the reference server."""
    return _needs(name, resolve_params(name, **params))[0]


def needs_rejected(name: str) -> bool:
    """Whether `name` reads the rejected completion of a pair (False: sft)."""
    return _spec(name).rejected


def is_unpaired(name: str) -> bool:
    """Whether `name` trains on unpaired, labelled completions (kto) rather than pairs."""
    return _spec(name) in _UNPAIRED.values()


def needs_lengths(name: str, **params: Any) -> bool:
    """Whether `name` with `params` needs chosen_lengths and rejected_lengths (token counts)."""
    return _needs(name, resolve_params(name, **params))[1]


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
    if name in _UNPAIRED:
        raise ValueError(f"loss {name!r} is unpaired: call unpaired_loss, not pairwise_loss")
    params = resolve_params(name, **params)
    reference, lengths = _needs(name, params)
    spec = _PAIRWISE[name]

    chosen = _logps("policy_chosen_logps", policy_chosen_logps, None)
    if not spec.rejected:
        _missing(name, "completion lengths", chosen_lengths=chosen_lengths)
        p = Pairs(chosen, chosen, None, None, _lengths("chosen_lengths", chosen_lengths, chosen), None)
        per_example = spec.fn(p)  # [B]
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
    per_example = spec.fn(p, **params)  # [B]
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
    if name in _PAIRWISE:
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
    # unpaired loss has the one signature of DESIGN.md.

    per_example, z = _UNPAIRED[name].fn(policy, ref, desirable, kl_policy, kl_ref, **params)
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

    Metrics: loss, rm/accuracy (share of pairs with r_c > r_r), rm/margin (mean r_c − r_r),
    rewards/chosen, rewards/rejected (mean rewards)."""
    if name not in _REWARD:
        raise ValueError(f"loss {name!r} is not a reward-model loss (known: {', '.join(_REWARD)})")
    params = resolve_params(name, **params)
    chosen = _logps("chosen_rewards", chosen_rewards, None)
    rejected = _logps("rejected_rewards", rejected_rewards, chosen)
    per_example = _REWARD[name].fn(chosen, rejected, **params)
    loss = per_example.mean()
    with torch.no_grad():
        values = {"loss": loss, "rm/accuracy": (chosen > rejected).float().mean(),
                  "rm/margin": (chosen - rejected).mean(), "rewards/chosen": chosen.mean(),
                  "rewards/rejected": rejected.mean()}
    return LossOutput(loss, per_example, _to_floats(values))

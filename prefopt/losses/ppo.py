"""The pure mathematics of PPO and of critic-free advantages: plain tensors in and out.

Per-token tensors are [B, T] over completion tokens; `mask` [B, T] (bool or float) is 1 on
real completion tokens and 0 on right padding, so each row's real tokens are a prefix. Inputs
at masked positions are ignored (they may hold anything, inf and nan included) and every
per-token output is 0 there. Log-probs are in nats. No model, no IO, no Ray.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

KL_ESTIMATORS = ("k1", "k2", "k3")


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    """x with masked positions set to 0 by selection, so that padding cannot leak inf or nan."""
    return torch.where(mask.bool(), x, torch.zeros_like(x))


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return _masked(x, mask).sum() / mask.bool().sum()


def _masked_var(x: Tensor, mask: Tensor) -> Tensor:
    """Population (divide-by-n) variance over the real tokens."""
    return _masked_mean((x - _masked_mean(x, mask)) ** 2, mask)


def kl_penalty(logps: Tensor, ref_logps: Tensor, mask: Tensor, estimator: str) -> Tensor:
    """Per-token estimate [B, T] of KL(π‖π_ref) from tokens sampled from π; masked positions 0.

    logps, ref_logps, mask: [B, T]. With log r = ref_logps − logps (Schulman, "Approximating
    KL divergence", 2020): k1 = −log r (unbiased, can be negative), k2 = ½(log r)² (biased, low
    variance), k3 = (r − 1) − log r (unbiased and ≥ 0).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_penalty: estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    log_r = _masked(ref_logps - logps, mask)  # 0 on padding, so exp() below cannot overflow there
    if estimator == "k1":
        return -log_r  # Schulman 2020, k1 = −log r
    if estimator == "k2":
        return 0.5 * log_r**2  # Schulman 2020, k2 = ½(log r)²
    return torch.expm1(log_r) - log_r  # Schulman 2020, k3 = (r − 1) − log r; 0 where log r = 0


def shape_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards [B, T]: −kl_coef·kl on every real token, plus the score on the last one.

    scores: [B], one reward-model score per sequence; kl, mask: [B, T]. Every row needs at least
    one real token (the score has to land somewhere).
    """
    real = mask.bool()
    if not real.any(dim=1).all():
        raise ValueError("shape_rewards: every row needs at least one real completion token")
    # Ziegler et al. 2019 (arXiv 1909.08593) / InstructGPT (arXiv 2203.02155) eq. 2:
    # R(x, y) = r(x, y) − β·log(π(y|x)/π_ref(y|x)), the KL spread over tokens, r at the end.
    rewards = _masked(-kl_coef * kl, real)
    positions = torch.arange(1, real.shape[1] + 1, device=real.device)
    last = (real * positions).argmax(dim=1)  # index of each row's last real token
    rows = torch.arange(real.shape[0], device=real.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimates and returns, both [B, T], masked positions 0, no grad.

    rewards, values, mask: [B, T], rows right-padded to different lengths. The value after a
    row's last real token is 0 (the episode ends there), so each row's recursion starts at its
    own last token.
    """
    rewards, values = _masked(rewards, mask), _masked(values, mask)
    real = mask.bool()
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])  # V_{t+1}; 0 past the end and on padding
    next_advantage = torch.zeros_like(values[:, 0])  # A_{t+1}; likewise
    for t in reversed(range(values.shape[1])):
        # Schulman et al. 2016 (arXiv 1506.02438) eq. 16: δ_t = r_t + γV_{t+1} − V_t,
        # A_t = δ_t + γλA_{t+1}
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = torch.where(real[:, t], delta + gamma * lam * next_advantage, 0.0)
        advantages[:, t] = advantage
        next_value, next_advantage = values[:, t], advantage
    returns = advantages + values  # the λ-return, the value target: R_t = A_t + V_t
    return advantages, returns


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """x [B, T] scaled to variance 1 over the real tokens (and moved to mean 0 if shift_mean).

    The mean and the (population, divide-by-n) variance are taken over every real token of the
    tensor given, so the controller calls this once on the whole rollout batch, never per
    micro-batch or per rank. shift_mean=False keeps x's mean: (x − μ)/σ + μ. Masked positions 0.
    """
    if not mask.bool().any():
        raise ValueError("whiten: the mask has no real tokens")
    mean = _masked_mean(x, mask)
    out = (x - mean) * torch.rsqrt(_masked_var(x, mask) + eps)
    if not shift_mean:
        out = out + mean
    return _masked(out, mask)


def _denominator(mask: Tensor, denominator: float | Tensor | None) -> float | Tensor:
    return mask.bool().sum().clamp(min=1) if denominator is None else denominator


def clipped_policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    denominator: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO's clipped surrogate: a scalar loss and metrics {"clipfrac", "approx_kl"}.

    logps (with grad), old_logps (of the policy that sampled), advantages, mask: [B, T]. The
    per-token losses are summed over real tokens and divided by `denominator` (default: this
    call's real-token count, at least 1). To make the loss a token mean over a whole minibatch
    split across ranks and micro-batches, pass that minibatch's total real-token count: the
    gradients summed over the pieces are then those of the whole. Metrics are python floats
    over this call's real tokens only: clipfrac, the share where the clipped branch is taken;
    approx_kl, the mean k3 estimate of KL(π_old‖π) from tokens sampled from π_old, i.e.
    (ratio − 1) − log ratio (Schulman 2020), unbiased and ≥ 0.
    """
    advantages = _masked(advantages, mask)  # padding (even nan) cannot reach the gradient
    ratio = torch.exp(_masked(logps - old_logps, mask))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    # Schulman et al. 2017 (arXiv 1707.06347) eq. 7, negated into a loss:
    # L = max(−A·r, −A·clip(r, 1 − ε, 1 + ε))
    per_token = torch.maximum(unclipped, clipped)
    loss = _masked(per_token, mask).sum() / _denominator(mask, denominator)
    with torch.no_grad():
        real = mask.bool()
        if real.any():
            clipfrac = _masked_mean((clipped > unclipped).to(ratio.dtype), real).item()
            # k3 with the roles of kl_penalty swapped: samples from π_old, log r = log π − log π_old
            approx_kl = _masked_mean(kl_penalty(old_logps, logps, real, "k3"), real).item()
        else:
            clipfrac, approx_kl = 0.0, 0.0
    return loss, {"clipfrac": clipfrac, "approx_kl": approx_kl}


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float,
    denominator: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The critic's clipped squared error: a scalar loss and metrics {"vf_clipfrac"}.

    values (with grad), old_values (at rollout time), returns, mask: [B, T]. Aggregated like
    `clipped_policy_loss` (sum over real tokens / denominator); vf_clipfrac is the share of
    this call's real tokens where the clipped error is the larger one.
    """
    values, old_values, returns = (_masked(x, mask) for x in (values, old_values, returns))
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    # PPO's value clipping as Engstrom et al. 2020 (arXiv 2005.12729) write it, halved:
    # ½·max((V − R)², (clip(V, V_old − ε, V_old + ε) − R)²)
    per_token = 0.5 * torch.maximum(error, clipped_error)
    loss = _masked(per_token, mask).sum() / _denominator(mask, denominator)
    with torch.no_grad():
        real = mask.bool()
        vf_clipfrac = _masked_mean((clipped_error > error).to(values.dtype), real).item() if real.any() else 0.0
    return loss, {"vf_clipfrac": vf_clipfrac}


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 − Var[R − V]/Var[R] over the real tokens of [B, T] values and returns.

    1 is a perfect critic, 0 one no better than a constant, < 0 worse. Population variances.
    Returns nan when Var[R] = 0 or there are no real tokens: the ratio is undefined there, and
    0 would wrongly claim a critic no better than a constant.
    """
    real = mask.bool()
    if not real.any():
        return math.nan
    var_returns = _masked_var(returns, real).item()
    return math.nan if var_returns == 0.0 else 1.0 - _masked_var(returns - values, real).item() / var_returns


def _groups(scores: Tensor, k: int, name: str) -> Tensor:
    if k < 2:
        raise ValueError(f"{name}: needs k >= 2 samples per prompt for a baseline from the others, got k={k}")
    if scores.dim() != 1 or scores.numel() % k:
        raise ValueError(f"{name}: scores must be a flat [N·k] vector, got shape {tuple(scores.shape)} with k={k}")
    return scores.view(-1, k)  # [N, k]: the samples of a prompt are contiguous


def rloo_advantages(scores: Tensor, k: int) -> Tensor:
    """One advantage per sequence [N·k]: its score minus the mean score of its k − 1 siblings.

    scores: [N·k], the k samples of each prompt contiguous.
    """
    groups = _groups(scores, k, "rloo_advantages")
    # RLOO, Ahmadian et al. 2024 (arXiv 2402.14740): r_i − 1/(k−1)·Σ_{j≠i} r_j
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / (k - 1)
    return (groups - baseline).reshape(-1)


def grpo_advantages(scores: Tensor, k: int, scale: bool = True, eps: float = 1e-6) -> Tensor:
    """One advantage per sequence [N·k]: (r_i − mean_group)/(std_group + eps).

    scores: [N·k], the k samples of each prompt contiguous. std is the unbiased (k − 1) sample
    standard deviation, torch's default. scale=False leaves out the division (r_i − mean only).
    """
    groups = _groups(scores, k, "grpo_advantages")
    # Shao et al. 2024 (DeepSeekMath, arXiv 2402.03300) eq. 3 / §4.1.2: Â_i = (r_i − mean(r))/std(r)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def sequence_to_tokens(advantages: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence values [B] broadcast over each row's real tokens: [B, T], 0 on padding."""
    return _masked(advantages[:, None].expand(mask.shape), mask)


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, coef: float):
        if coef < 0:
            raise ValueError(f"FixedKLController: coef must be >= 0, got {coef}")
        self.coef = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to do: the coefficient is fixed."""

    def state_dict(self) -> dict:
        return {"kind": "fixed", "coef": self.coef}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "fixed":
            raise ValueError(f"FixedKLController: cannot load a {state.get('kind')!r} controller's state")
        self.coef = float(state["coef"])


class AdaptiveKLController:
    """A KL coefficient steered toward a target KL (Ziegler et al. 2019, arXiv 1909.08593)."""

    def __init__(self, init_coef: float, target: float, horizon: int):
        if init_coef <= 0 or target <= 0 or horizon <= 0:
            raise ValueError(
                f"AdaptiveKLController: init_coef, target and horizon must be > 0, "
                f"got init_coef={init_coef}, target={target}, horizon={horizon}"
            )
        self.coef, self.target, self.horizon = float(init_coef), float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move coef after n_steps samples (or steps) that measured `current_kl` (nats)."""
        # Ziegler et al. 2019: e_t = clip(KL_t/KL_target − 1, −0.2, 0.2),
        # β_{t+1} = β_t·(1 + K_β·e_t) with K_β = n_steps/horizon
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"kind": "adaptive", "coef": self.coef, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "adaptive":
            raise ValueError(f"AdaptiveKLController: cannot load a {state.get('kind')!r} controller's state")
        self.coef, self.target, self.horizon = float(state["coef"]), float(state["target"]), int(state["horizon"])


def kl_controller(
    coef: float, target: float | None = None, horizon: int = 10000
) -> FixedKLController | AdaptiveKLController:
    """FixedKLController(coef) when target is None, else AdaptiveKLController(coef, target, horizon)."""
    if target is None:
        return FixedKLController(coef)
    return AdaptiveKLController(coef, target, horizon)

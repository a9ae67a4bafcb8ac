"""Pairwise preference losses: one small function per loss, over per-sequence log-probs.

Notation (docs/losses.md): πc, πr are policy log-probs summed over completion tokens; rc, rr
the same under the reference; Lc, Lr completion token counts; ρ = π − r; Δ = ρc − ρr.
Every loss function takes a `Pairs` batch plus its parameters and returns the per-example
loss, shape [B]. Inputs arrive checked and upcast to fp32 by `prefopt.losses.registry`.

Most losses are points of the GPO view (arXiv 2402.05749): f(β·(score_c − score_r) − γ)
for a function f and a score. Those that fit it call `gpo` so each idea is written once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from prefopt.losses.names import REFERENCE_SCORES


@dataclass(frozen=True)
class Pairs:
    """A batch of B preference pairs; every tensor is [B], fp32 or wider; None = not given."""

    chosen: Tensor  # πc, summed log-prob of the chosen completion (nats, ≤ 0)
    rejected: Tensor  # πr
    ref_chosen: Tensor | None = None  # rc
    ref_rejected: Tensor | None = None  # rr
    chosen_lengths: Tensor | None = None  # Lc, completion tokens (≥ 1)
    rejected_lengths: Tensor | None = None  # Lr


def logratios(p: Pairs) -> tuple[Tensor, Tensor]:
    """(ρc, ρr), each [B]: how much more likely the policy makes each completion than the reference."""
    return p.chosen - p.ref_chosen, p.rejected - p.ref_rejected


def mean_nll(p: Pairs) -> Tensor:
    """−πc/Lc, [B]: the chosen completion's mean token NLL (the SFT term of RPO, CPO and ORPO)."""
    return -p.chosen / p.chosen_lengths


def sft(p: Pairs) -> Tensor:
    """Supervised fine-tuning on the chosen completion: its mean token NLL −πc/Lc, [B].
    Per-example means keep the loss independent of how examples are split over ranks."""
    return mean_nll(p)


# ----------------------------------------------------------------------- stable primitives

_LN2 = math.log(2.0)


def logistic(x: Tensor) -> Tensor:
    """−log σ(x) = log(1 + e^−x); logsigmoid never forms e^−x, so any x stays finite."""
    return -F.logsigmoid(x)


def log1mexp(a: Tensor) -> Tensor:
    """log(1 − e^a) for a < 0 (−inf at a = 0), accurate for every a (Mächler 2012).

    Near 0, 1 − e^a cancels, so log(−expm1(a)); below −ln 2, e^a is small, so log1p(−e^a).
    Each branch only sees inputs on its own side of −ln 2: the branch torch.where drops must
    not hold an inf, because its zero-weighted gradient would still turn into NaN.
    """
    near_zero = torch.log(-torch.expm1(a.clamp(min=-_LN2)))
    far = torch.log1p(-torch.exp(a.clamp(max=-_LN2)))
    return torch.where(a > -_LN2, near_zero, far)


# ------------------------------------------------------------------------------- GPO view

# Below this x, e^−x (> 2.2e4) is continued by its tangent line: e^−x overflows fp32 at
# x ≈ −88, and a log-ratio of −1e4 must give a finite loss, and a gradient that still fits
# fp16 (max 65504) when it flows back into fp16 log-probs.
_EXP_TANGENT_BELOW = -10.0


def _exponential(x: Tensor) -> Tensor:
    c = _EXP_TANGENT_BELOW
    tangent = math.exp(-c) * (1.0 + c - x)  # e^−c − e^−c·(x − c): convex, C¹ at c
    return torch.where(x >= c, torch.exp(-x.clamp(min=c)), tangent)


# f of the GPO family, as functions of x = β·(score_c − score_r) − γ (Sec. 2 of arXiv
# 2402.05749). Each decreases in x, so minimising f pushes the chosen score above the rejected.
GPO_FUNCTIONS = {
    "logistic": logistic,  # DPO
    "hinge": lambda x: torch.relu(1.0 - x),  # SLiC
    "squared": lambda x: (x - 1.0) ** 2,  # IPO (up to scale, see `ipo`)
    "exponential": _exponential,
    "truncated_squared": lambda x: torch.relu(1.0 - x) ** 2,
    "savage": lambda x: torch.sigmoid(-x) ** 2,  # bounded; not convex
}



def scores(p: Pairs, score: str) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) scores, each [B], for one of names.GPO_SCORES."""
    if score in REFERENCE_SCORES:
        chosen, rejected = logratios(p)
    else:
        chosen, rejected = p.chosen, p.rejected
    if score.startswith("avg_"):
        chosen, rejected = chosen / p.chosen_lengths, rejected / p.rejected_lengths
    return chosen, rejected


def preference_margin(p: Pairs, score: str, beta: float, gamma: float) -> Tensor:
    """x = β·(score_c − score_r) − γ, [B]: the argument every GPO function is applied to."""
    chosen, rejected = scores(p, score)
    return beta * (chosen - rejected) - gamma


def gpo(p: Pairs, *, beta: float, function: str, score: str, gamma: float) -> Tensor:
    """f(β·(score_c − score_r) − γ), [B]: any function, score and margin (arXiv 2402.05749)."""
    return GPO_FUNCTIONS[function](preference_margin(p, score, beta, gamma))


# ------------------------------------------------------------------- the named losses

def dpo(p: Pairs, *, beta: float, label_smoothing: float) -> Tensor:
    """DPO; label_smoothing ε > 0 is conservative DPO (cDPO). [B]"""
    x = preference_margin(p, "sum_logratio", beta, 0.0)  # βΔ
    eps = label_smoothing
    # Eq. 7 of arXiv 2305.18290 is ε = 0 (GPO logistic). ε > 0: the expected loss when each
    # label is flipped with probability ε (DPO reference repo, `preference_loss`).
    return (1.0 - eps) * logistic(x) + eps * logistic(-x)


def robust(p: Pairs, *, beta: float, label_smoothing: float) -> Tensor:
    """rDPO: unbiased under labels flipped with probability ε = label_smoothing. [B]"""
    x = preference_margin(p, "sum_logratio", beta, 0.0)  # βΔ
    eps = label_smoothing
    # rDPO, arXiv 2403.00409: debiases the noisy-label loss; unlike cDPO it can be negative.
    return ((1.0 - eps) * logistic(x) - eps * logistic(-x)) / (1.0 - 2.0 * eps)


def hinge(p: Pairs, *, beta: float) -> Tensor:
    """SLiC-HF hinge on the DPO margin: max(0, 1 − βΔ). [B]"""
    # SLiC-HF calibration loss, arXiv 2305.10425, on log-ratios: GPO with f = hinge.
    return gpo(p, beta=beta, function="hinge", score="sum_logratio", gamma=0.0)


def ipo(p: Pairs, *, beta: float) -> Tensor:
    """IPO with per-token averaged log-ratios: (ρc/Lc − ρr/Lr − 1/(2β))². [B]"""
    # Eq. 17 of arXiv 2310.12036 with τ = beta: (h − 1/(2τ))² = (1 − 2τh)² / (2τ)², i.e.
    # GPO's squared f at β' = 2τ, divided by β'² so the value is IPO's own.
    two_tau = 2.0 * beta
    return gpo(p, beta=two_tau, function="squared", score="avg_logratio", gamma=0.0) / two_tau**2


def nca_pair(p: Pairs, *, beta: float) -> Tensor:
    """NCA for two responses: −log σ(βρc) − ½ log σ(−βρc) − ½ log σ(−βρr). [B]"""
    rho_c, rho_r = logratios(p)
    # NCA, arXiv 2402.05369: absolute rewards, so the chosen log-prob is pushed up, not
    # only the margin; the ½ terms are the contrast over both responses.
    return logistic(beta * rho_c) + 0.5 * logistic(-beta * rho_c) + 0.5 * logistic(-beta * rho_r)


def bco_pair(p: Pairs, *, beta: float) -> Tensor:
    """BCO on pairs, no running-mean shift: −log σ(βρc) − log σ(−βρr). [B]"""
    rho_c, rho_r = logratios(p)
    # BCO, arXiv 2404.04656: chosen classified as good, rejected as bad, separately.
    return logistic(beta * rho_c) + logistic(-beta * rho_r)


def sppo_hard(p: Pairs, *, beta: float) -> Tensor:
    """SPPO with hard labels: (ρc − 1/(2β))² + (ρr + 1/(2β))². [B]"""
    rho_c, rho_r = logratios(p)
    # SPPO, arXiv 2405.00675, with win probabilities 1 and 0: each log-ratio regresses to
    # its own target ±1/(2β), so both move, unlike IPO's single margin.
    return (rho_c - 0.5 / beta) ** 2 + (rho_r + 0.5 / beta) ** 2


def apo_zero(p: Pairs, *, beta: float) -> Tensor:
    """APO-zero: 1 − σ(βρc) + σ(βρr). [B]"""
    rho_c, rho_r = logratios(p)
    # APO, arXiv 2408.06266: chosen up, rejected down, each anchored at ρ = 0.
    # 1 − σ(x) is written σ(−x), which keeps its precision when σ(x) rounds to 1.
    return torch.sigmoid(-beta * rho_c) + torch.sigmoid(beta * rho_r)


def apo_down(p: Pairs, *, beta: float) -> Tensor:
    """APO-down: σ(βρc) + 1 − σ(βΔ). [B]"""
    rho_c, rho_r = logratios(p)
    # APO, arXiv 2408.06266: for chosen answers worse than the model's own; both
    # likelihoods go down, the rejected one faster.
    return torch.sigmoid(beta * rho_c) + torch.sigmoid(-beta * (rho_c - rho_r))


def discopop(p: Pairs, *, beta: float, tau: float) -> Tensor:
    """DiscoPOP: (1 − m)·(−log σ(z)) + m·e^−z, z = βΔ, m = σ(z/τ). [B]"""
    z = preference_margin(p, "sum_logratio", beta, 0.0)
    # DiscoPOP, arXiv 2406.08414: logistic for z < 0, exponential for z > 0, blended by m.
    # m·e^−z is exp(log σ(z/τ) − z): for z ≪ 0, m underflows to 0 while e^−z overflows, and
    # 0·inf is NaN. For τ ≤ 1 the exponent is bounded above for every z.
    return torch.sigmoid(-z / tau) * logistic(z) + torch.exp(F.logsigmoid(z / tau) - z)


def simpo(p: Pairs, *, beta: float, gamma: float) -> Tensor:
    """SimPO: −log σ(β·(πc/Lc − πr/Lr) − γ), no reference model. [B]"""
    # SimPO, arXiv 2405.14734: length-normalised reward and a target margin γ; GPO with
    # f = logistic on per-token log-probs.
    return gpo(p, beta=beta, function="logistic", score="avg_logp", gamma=gamma)


def cpo(p: Pairs, *, beta: float) -> Tensor:
    """CPO's preference term: −log σ(β·(πc − πr)), no reference model. [B]

    Its NLL term α·(−πc/Lc) is the common `sft_weight` term (default 1.0 for cpo).
    """
    # CPO, arXiv 2401.08417: DPO with a uniform reference; GPO logistic on summed log-probs.
    return gpo(p, beta=beta, function="logistic", score="sum_logp", gamma=0.0)


# A sequence whose every token has probability 1 in fp32 has mean log-prob exactly 0, where
# log(1 − p) = −inf. Clamp to −2^−24, the largest log-prob below 0 fp32 can tell from 0.
_LARGEST_MEAN_LOGP = -(2.0**-24)


def _log_odds(mean_logp: Tensor) -> Tensor:
    """log(p / (1 − p)) from p̄ = log p: p̄ − log(1 − e^p̄). [B]"""
    mean_logp = mean_logp.clamp(max=_LARGEST_MEAN_LOGP)
    return mean_logp - log1mexp(mean_logp)


def orpo(p: Pairs, *, beta: float) -> Tensor:
    """ORPO: −πc/Lc + λ·(−log σ(ℓc − ℓr)), ℓ = log odds of the mean token log-prob; λ = beta. [B]"""
    log_odds_c = _log_odds(p.chosen / p.chosen_lengths)
    log_odds_r = _log_odds(p.rejected / p.rejected_lengths)
    # ORPO, arXiv 2403.07691: SFT loss plus λ times the log-sigmoid of the log odds ratio.
    return mean_nll(p) + beta * logistic(log_odds_c - log_odds_r)

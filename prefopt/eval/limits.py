"""The two reference limits a reward–KL plot draws above the methods' frontiers, estimated from
N samples of the reference policy per prompt and their rewards (docs/limits.md).

    rewards = np.array(...)                       # (P, N): prompts x reference samples, r_ij
    bon = best_of_n(rewards)                      # best-of-1, 2, 4, ... N: analytic KL bound
    opt = kl_optimum(rewards)                     # π* ∝ π_ref·exp(r/β) over a β grid (SNIS)
    reward_at_kl(opt, 2.0)                        # the optimum's reward at KL 2 nats, or None

Prompts are the independent unit: every quantity is computed per prompt, then averaged, and its
standard error is over prompts (prefopt.eval.stats). KL is in nats, sequence-level, as the
evaluator's `eval/kl`. Pure numpy: no torch, no Ray.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from prefopt.eval.stats import mean_and_se

# Below this mean ESS / N the self-normalised estimate rests on a few samples: its reward is
# biased down (O(1/ESS)) and its KL saturates at log N, so the curve bends over for lack of
# samples. A limit drawn too low lets a method look above it, so the floor errs strict.
ESS_FLOOR = 0.1


@dataclass(frozen=True)
class LimitPoint:
    """One point of a limit curve: means over prompts and their standard errors over prompts.
    `ess` is the mean over prompts of ESS / N (optimum only); `reliable` is False for a point
    kept below the ESS floor."""

    kl: float  # nats
    reward: float
    reward_se: float
    kl_se: float
    label: str  # "best-of-4", "optimum β=0.5"
    ess: float | None = None
    reliable: bool = True


def _check_rewards(rewards) -> np.ndarray:
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] < 1 or r.shape[1] < 1:
        raise ValueError(f"rewards must be (prompts, samples) with at least one of each, got shape {r.shape}")
    if not np.isfinite(r).all():
        raise ValueError(f"rewards are not all finite: rows {sorted(set(np.nonzero(~np.isfinite(r))[0].tolist()))}")
    return r


def _log_comb(a: int, b: int) -> float:
    return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)


def order_statistic_weights(num_samples: int, n: int) -> np.ndarray:
    """(N,) weights of the ascending-sorted rewards in the unbiased estimate of E[max of n]:
    w_k = C(k−1, n−1) / C(N, n) for k = n..N, else 0 — the mean of the max over all C(N, n)
    subsets of n of the N samples (a U-statistic). They sum to 1 (hockey-stick identity)."""
    if not 1 <= n <= num_samples:
        raise ValueError(f"n must be in 1..{num_samples} (the samples per prompt), got {n}")
    weights = np.zeros(num_samples)
    log_total = _log_comb(num_samples, n)
    # In log space: C(k−1, n−1) and C(N, n) overflow a float long before their ratio does.
    for k in range(n, num_samples + 1):
        weights[k - 1] = math.exp(_log_comb(k - 1, n - 1) - log_total)
    return weights


def expected_max(rewards, n: int) -> np.ndarray:
    """(P,) per-prompt unbiased estimates of E[max of n reference samples] from (P, N) rewards."""
    r = _check_rewards(rewards)
    return np.sort(r, axis=1) @ order_statistic_weights(r.shape[1], n)


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n ‖ π_ref) = log n − (n − 1)/n nats: exact when rewards have no ties, an upper
    bound otherwise (Stiennon et al. 2020, arXiv 2009.01325; Beirami et al. 2024, arXiv 2401.01879)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n(rewards, ns: Sequence[int] | None = None) -> list[LimitPoint]:
    """Best-of-n from (P, N) reference rewards for n in `ns` (default 1, 2, 4, ... <= N), in
    increasing n. kl is the analytic value (kl_se 0): with ties among rewards (a discrete reward)
    the true KL is lower, so the point sits to the right of where it belongs — conservative."""
    r = _check_rewards(rewards)
    num_samples = r.shape[1]
    if ns is None:
        ns = [2**i for i in range(num_samples.bit_length()) if 2**i <= num_samples]
    points = []
    for n in sorted(set(ns)):
        reward, reward_se = mean_and_se(expected_max(r, n).tolist())
        points.append(LimitPoint(kl=best_of_n_kl(n), reward=reward, reward_se=reward_se, kl_se=0.0,
                                 label=f"best-of-{n}"))
    return points


def beta_grid(rewards, num: int = 25, low: float = 0.01, high: float = 100.0) -> np.ndarray:
    """(num,) β values log-spaced from high·s down to low·s (largest first: KL increasing), s the
    mean over prompts of the rewards' standard deviation within a prompt (1 if it is 0).
    At β = 100 s the optimum is almost the reference (KL ≈ Var r / 2β² ≈ 5e-5); at β = s/100 it
    is almost greedy on the reward (there the ESS floor cuts it)."""
    if num < 1 or not 0 < low < high:
        raise ValueError(f"need num >= 1 and 0 < low < high, got num={num}, low={low}, high={high}")
    scale = float(_check_rewards(rewards).std(axis=1).mean())
    if scale == 0.0:  # every prompt's samples tie: every β gives the reference itself
        scale = 1.0
    return scale * np.geomspace(high, low, num)


def tilt(rewards, beta: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per prompt, the optimum π* ∝ π_ref·exp(r/β) estimated by self-normalised importance sampling
    on (P, N) reference rewards: (reward (P,), kl (P,), ess_fraction (P,)).
    w_j = softmax_j(r_j/β); E_π*[r] = Σ w_j r_j; KL = E_π*[r]/β − log mean_j exp(r_j/β);
    ESS = 1/Σ w_j², reported over N."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    r = _check_rewards(rewards)
    num_samples = r.shape[1]
    # Shifted by each prompt's max reward: exp never overflows, and both KL terms are O(spread/β)
    # instead of O(r/β), so their difference at large β keeps its digits.
    z = (r - r.max(axis=1, keepdims=True)) / beta  # (P, N), <= 0
    log_mean_exp = np.log(np.exp(z).mean(axis=1))  # (P,): log E_ref[exp(r/β)] − max r/β
    # π* ∝ π_ref·exp(r/β): Eq. 4 of arXiv 2305.18290, on the empirical reference (mass 1/N each).
    w = np.exp(z - (log_mean_exp + math.log(num_samples))[:, None])  # (P, N), rows sum to 1
    reward = (w * r).sum(axis=1)
    kl = np.maximum((w * z).sum(axis=1) - log_mean_exp, 0.0)  # >= 0 but for rounding
    ess_fraction = 1.0 / (w**2).sum(axis=1) / num_samples
    return reward, kl, ess_fraction


def kl_optimum(rewards, betas: Sequence[float] | None = None, ess_floor: float = ESS_FLOOR,
               keep_unreliable: bool = False) -> list[LimitPoint]:
    """The KL-regularised optimum's (KL, reward) over `betas` (default beta_grid(rewards)), from
    (P, N) reference rewards, in decreasing β (increasing KL). A point whose mean ESS / N is below
    `ess_floor` is dropped, or kept with reliable=False if `keep_unreliable`. The estimate cannot
    pass KL = log N (the KL of a point mass on one of N samples)."""
    r = _check_rewards(rewards)
    if betas is None:
        betas = beta_grid(r)
    points = []
    for beta in sorted((float(b) for b in betas), reverse=True):
        reward_i, kl_i, ess_i = tilt(r, beta)
        ess = float(ess_i.mean())
        reliable = ess >= ess_floor
        if not reliable and not keep_unreliable:
            continue
        reward, reward_se = mean_and_se(reward_i.tolist())
        kl, kl_se = mean_and_se(kl_i.tolist())
        points.append(LimitPoint(kl=kl, reward=reward, reward_se=reward_se, kl_se=kl_se,
                                 label=f"optimum β={beta:.3g}", ess=ess, reliable=reliable))
    return points


def reward_at_kl(points: Sequence[LimitPoint], kl: float) -> float | None:
    """A limit curve's reward at `kl`, linear between its reliable points; None outside their KL
    range (no extrapolation) — for a table of methods and limits at matched KL."""
    kept = sorted((p for p in points if p.reliable), key=lambda p: p.kl)
    if not kept or not kept[0].kl <= kl <= kept[-1].kl:
        return None
    return float(np.interp(kl, [p.kl for p in kept], [p.reward for p in kept]))

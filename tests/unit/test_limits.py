"""The reward–KL limits (prefopt.eval.limits) against closed forms on a categorical reference."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from prefopt.eval.limits import (
    LimitPoint,
    best_of_n,
    best_of_n_kl,
    beta_grid,
    expected_max,
    kl_optimum,
    order_statistic_weights,
    reward_at_kl,
    tilt,
)

# The reference: three outcomes with probabilities P and rewards R (sorted ascending).
P = np.array([0.5, 0.3, 0.2])
R = np.array([0.0, 1.0, 3.0])


def draw(prompts, samples, seed=0):
    return np.random.default_rng(seed).choice(R, size=(prompts, samples), p=P)


def exact_max(n):
    # P(max of n <= r_k) = F(r_k)^n, so P(max = r_k) = F(r_k)^n − F(r_{k−1})^n.
    cdf = np.cumsum(P)
    return float(R @ (cdf**n - np.concatenate([[0.0], cdf[:-1]]) ** n))


def exact_optimum(beta):
    pi = P * np.exp(R / beta)
    pi /= pi.sum()
    return float(pi @ R), float(pi @ np.log(pi / P))


# --- order-statistics weights -----------------------------------------------------------


def test_weights_by_hand():
    # N = 4, n = 2: C(k−1, 1)/C(4, 2) = (0, 1, 2, 3)/6.
    np.testing.assert_allclose(order_statistic_weights(4, 2), [0, 1 / 6, 2 / 6, 3 / 6])


@pytest.mark.parametrize("num_samples,n", [(1, 1), (5, 1), (5, 3), (5, 5), (64, 8), (1000, 500), (4096, 4096)])
def test_weights_sum_to_one(num_samples, n):
    w = order_statistic_weights(num_samples, n)
    assert w.shape == (num_samples,) and (w >= 0).all()
    assert w.sum() == pytest.approx(1.0, abs=1e-9)


def test_max_and_mean_are_the_ends():
    r = np.array([[3.0, -1.0, 2.0, 7.0, 0.5], [1.0, 1.0, 4.0, -2.0, 0.0]])
    np.testing.assert_allclose(expected_max(r, 5), [7.0, 4.0])
    np.testing.assert_allclose(expected_max(r, 1), [2.3, 0.8])


def test_estimate_is_the_mean_over_all_subsets():
    r = np.array([[3.0, -1.0, 2.0, 7.0, 0.5, 2.0]])
    for n in range(1, 7):
        subsets = [max(s) for s in itertools.combinations(r[0], n)]
        assert expected_max(r, n)[0] == pytest.approx(sum(subsets) / len(subsets))


def test_n_out_of_range():
    with pytest.raises(ValueError, match="n must be"):
        order_statistic_weights(4, 5)
    with pytest.raises(ValueError, match="n must be"):
        order_statistic_weights(4, 0)


# --- best-of-n ----------------------------------------------------------------------------


def test_best_of_n_kl_formula():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)


def test_best_of_n_matches_the_exact_max():
    points = best_of_n(draw(4000, 16))
    assert [p.label for p in points] == ["best-of-1", "best-of-2", "best-of-4", "best-of-8", "best-of-16"]
    for p, n in zip(points, [1, 2, 4, 8, 16], strict=True):
        assert p.kl == pytest.approx(math.log(n) - (n - 1) / n) and p.kl_se == 0.0
        assert 0 < p.reward_se < 0.03  # the check below has teeth
        assert abs(p.reward - exact_max(n)) < 4 * p.reward_se, (n, p.reward, exact_max(n))
    assert points[0].reward == pytest.approx(float(P @ R), abs=0.02)
    assert points[-1].reward > points[0].reward


def test_best_of_n_custom_ns_and_default_below_a_power_of_two():
    r = draw(3, 6)
    assert [p.label for p in best_of_n(r)] == ["best-of-1", "best-of-2", "best-of-4"]
    assert [p.label for p in best_of_n(r, ns=[6, 3])] == ["best-of-3", "best-of-6"]


# --- the KL-regularised optimum ---------------------------------------------------------------


def test_identity_on_the_exact_distributions():
    # KL(π*‖p) = Σ π* log(π*/p) equals E_π*[r]/β − log E_p[exp(r/β)].
    for beta in (0.1, 0.5, 1.0, 3.0, 50.0):
        reward, kl = exact_optimum(beta)
        assert kl == pytest.approx(reward / beta - math.log(P @ np.exp(R / beta)), rel=1e-12, abs=1e-15)


def test_estimate_is_exact_on_an_empirical_copy_of_the_reference():
    # 10 samples in the proportions of P: the SNIS estimate is the exact tilt of P.
    r = np.repeat(R, [5, 3, 2])[None, :]
    for beta in (0.2, 1.0, 4.0):
        reward, kl, _ = tilt(r, beta)
        exact_reward, exact_kl = exact_optimum(beta)
        assert reward[0] == pytest.approx(exact_reward, rel=1e-12)
        assert kl[0] == pytest.approx(exact_kl, rel=1e-10)


def test_optimum_matches_the_exact_tilt():
    betas = [4.0, 1.0, 0.5]
    points = kl_optimum(draw(50, 4000, seed=1), betas=betas)
    assert len(points) == 3
    for p, beta in zip(points, betas, strict=True):
        exact_reward, exact_kl = exact_optimum(beta)
        assert 0 < p.reward_se < 0.01 and 0 < p.kl_se < 0.01
        assert abs(p.reward - exact_reward) < 4 * p.reward_se + 1e-3, (beta, p.reward, exact_reward)
        assert abs(p.kl - exact_kl) < 4 * p.kl_se + 1e-3, (beta, p.kl, exact_kl)
        assert p.reliable and 0.1 < p.ess <= 1.0
    assert points[0].kl < points[1].kl < points[2].kl and points[0].reward < points[2].reward


def test_optimum_of_a_gaussian_reference():
    # r ~ N(0, 1) under π_ref: π* tilts it to N(1/β, 1), so E_π*[r] = 1/β, KL = 1/(2β²), and
    # ESS/N -> E[w]²/E[w²] = exp(−1/β²).
    r = np.random.default_rng(5).normal(size=(40, 4000))
    for p, beta in zip(kl_optimum(r, betas=[4.0, 2.0, 1.0]), [4.0, 2.0, 1.0], strict=True):
        assert abs(p.reward - 1 / beta) < 4 * p.reward_se
        assert abs(p.kl - 1 / (2 * beta**2)) < 4 * p.kl_se
        assert p.ess == pytest.approx(math.exp(-1 / beta**2), abs=0.01)


def test_large_beta_is_the_reference():
    r = draw(20, 64, seed=2)
    (p,) = kl_optimum(r, betas=[1e6])
    assert p.reward == pytest.approx(r.mean(), abs=1e-5)
    assert 0.0 <= p.kl < 1e-9
    assert p.ess == pytest.approx(1.0, abs=1e-6)


def test_kl_is_never_past_log_n():
    r = draw(10, 32, seed=3)
    for p in kl_optimum(r, betas=[1e-3, 0.1, 1.0], keep_unreliable=True):
        assert p.kl <= math.log(32) + 1e-12


# --- effective sample size ---------------------------------------------------------------------


def test_equal_rewards_have_full_ess():
    r = np.full((4, 8), 2.5)
    for p in kl_optimum(r):
        assert p.ess == pytest.approx(1.0) and p.kl == pytest.approx(0.0, abs=1e-15)
        assert p.reward == pytest.approx(2.5) and p.reliable


def test_one_outlier_at_small_beta_is_cut():
    num_samples = 20
    r = np.zeros((3, num_samples))
    r[:, 7] = 10.0
    _, _, ess = tilt(r, 0.1)
    np.testing.assert_allclose(ess, 1 / num_samples, rtol=1e-6)
    assert kl_optimum(r, betas=[0.1]) == []
    (p,) = kl_optimum(r, betas=[0.1], keep_unreliable=True)
    assert not p.reliable and p.ess == pytest.approx(1 / num_samples, rel=1e-6)
    assert p.reward == pytest.approx(10.0) and p.kl == pytest.approx(math.log(num_samples))
    # A floor of 0 keeps it as reliable.
    assert kl_optimum(r, betas=[0.1], ess_floor=0.0)[0].reliable


def test_default_grid_spans_reference_to_greedy():
    # Continuous rewards: no ties at the top, so the greedy end has ESS 1/N and is cut.
    r = np.random.default_rng(4).normal(size=(30, 256))
    betas = beta_grid(r)
    assert len(betas) == 25 and betas[0] > betas[-1]
    first, last = tilt(r, betas[0]), tilt(r, betas[-1])
    assert first[1].mean() < 1e-3  # almost the reference
    assert last[0].mean() == pytest.approx(r.max(axis=1).mean(), abs=1e-3)  # almost greedy
    points = kl_optimum(r)
    assert 1 < len(points) < 25 and all(p.ess >= 0.1 for p in points)


# --- standard errors ---------------------------------------------------------------------------


def test_standard_errors_by_hand():
    # Per-prompt means 2, 3, 7 and maxes 3, 4, 8: sample variance (4 + 1 + 9)/2 = 7 both ways.
    r = np.array([[1.0, 3.0], [2.0, 4.0], [6.0, 8.0]])
    one, two = best_of_n(r)
    assert one.reward == pytest.approx(4.0) and two.reward == pytest.approx(5.0)
    assert one.reward_se == pytest.approx(math.sqrt(7 / 3)) and two.reward_se == pytest.approx(math.sqrt(7 / 3))
    # Ties within each prompt: the optimum is the reference, per-prompt rewards 1, 2, 6.
    (p,) = kl_optimum(np.array([[1.0, 1.0], [2.0, 2.0], [6.0, 6.0]]), betas=[0.3])
    assert p.reward == pytest.approx(3.0) and p.reward_se == pytest.approx(math.sqrt(7 / 3))
    assert p.kl == 0.0 and p.kl_se == 0.0


# --- matched-KL interpolation and input checks --------------------------------------------------


def test_reward_at_kl():
    points = [LimitPoint(kl=0.0, reward=1.0, reward_se=0, kl_se=0, label="a"),
              LimitPoint(kl=2.0, reward=3.0, reward_se=0, kl_se=0, label="b"),
              LimitPoint(kl=1.0, reward=2.5, reward_se=0, kl_se=0, label="c"),
              LimitPoint(kl=5.0, reward=9.0, reward_se=0, kl_se=0, label="d", reliable=False)]
    assert reward_at_kl(points, 0.5) == pytest.approx(1.75)
    assert reward_at_kl(points, 1.5) == pytest.approx(2.75)
    assert reward_at_kl(points, 2.0) == pytest.approx(3.0)
    assert reward_at_kl(points, 3.0) is None  # past the last reliable point
    assert reward_at_kl(points, -0.1) is None
    assert reward_at_kl([], 1.0) is None


def test_bad_inputs():
    with pytest.raises(ValueError, match="prompts, samples"):
        best_of_n(np.zeros(4))
    with pytest.raises(ValueError, match="finite"):
        kl_optimum(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="beta"):
        tilt(np.zeros((1, 2)), 0.0)

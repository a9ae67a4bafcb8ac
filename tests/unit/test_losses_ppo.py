"""PPO mathematics and critic-free advantages against numbers worked out by hand."""

import json
import math

import pytest
import torch

from prefopt.losses.ppo import (
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

pytestmark = pytest.mark.unit

NAN = float("nan")


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


# ---- KL estimators ---------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    # log r = ref − logp = [−1, +1, 0]; the third token is padding holding garbage.
    logps, ref = t([[-1.0, -2.0, NAN]]), t([[-2.0, -1.0, 5.0]])
    mask = torch.tensor([[True, True, False]])
    # k1 = logp − ref = [1, −1]
    assert kl_penalty(logps, ref, mask, "k1").tolist()[0] == pytest.approx([1.0, -1.0, 0.0])
    # k2 = ½(log r)² = [½, ½]
    assert kl_penalty(logps, ref, mask, "k2").tolist()[0] == pytest.approx([0.5, 0.5, 0.0])
    # k3 = e^{log r} − log r − 1: e^{−1} + 1 − 1 = e^{−1}; e^{1} − 1 − 1 = e − 2
    assert kl_penalty(logps, ref, mask, "k3").tolist()[0] == pytest.approx([math.exp(-1), math.e - 2, 0.0])
    with pytest.raises(ValueError, match="estimator must be one of"):
        kl_penalty(logps, ref, mask, "k4")


def test_k3_is_zero_on_equal_and_never_negative():
    g = torch.Generator().manual_seed(0)
    logps, ref = torch.randn(64, 16, generator=g) * 3, torch.randn(64, 16, generator=g) * 3
    mask = torch.ones(64, 16)
    assert (kl_penalty(logps, ref, mask, "k3") >= 0).all()
    assert kl_penalty(logps, logps, mask, "k3").abs().max().item() == 0.0
    assert (kl_penalty(logps, ref, mask, "k1") < 0).any()  # k1 alone can be negative


# ---- reward shaping --------------------------------------------------------------------------


def test_shape_rewards_puts_the_score_on_the_last_real_token():
    scores = t([3.0, -1.0])
    kl = t([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    # row 0: −0.5·[0.1, 0.2, 0.3] + [0, 0, 3] = [−0.05, −0.1, 2.85]
    # row 1: −0.5·[0.4, 0.5] + [0, −1] = [−0.2, −1.25], padding 0
    expected = [[-0.05, -0.1, 2.85], [-0.2, -1.25, 0.0]]
    got = shape_rewards(scores, kl, mask, kl_coef=0.5)
    assert got.tolist()[0] == pytest.approx(expected[0])
    assert got.tolist()[1] == pytest.approx(expected[1])
    with pytest.raises(ValueError, match="at least one real completion token"):
        shape_rewards(scores, kl, t([[1, 1, 1], [0, 0, 0]]), kl_coef=0.5)


# ---- GAE -------------------------------------------------------------------------------------

REWARDS, VALUES = [1.0, 0.0, 2.0], [0.5, 1.0, 1.5]


def test_gae_gamma_1_lambda_095_by_hand():
    # δ2 = 2 + 0 − 1.5 = 0.5; δ1 = 0 + 1.5 − 1.0 = 0.5; δ0 = 1 + 1.0 − 0.5 = 1.5
    # A2 = 0.5; A1 = 0.5 + 0.95·0.5 = 0.975; A0 = 1.5 + 0.95·0.975 = 2.42625
    # returns = A + V = [2.92625, 1.975, 2.0]
    adv, ret = gae(t([REWARDS]), t([VALUES]), t([[1, 1, 1]]), gamma=1.0, lam=0.95)
    assert adv.tolist()[0] == pytest.approx([2.42625, 0.975, 0.5])
    assert ret.tolist()[0] == pytest.approx([2.92625, 1.975, 2.0])


def test_gae_gamma_09_lambda_1_by_hand():
    # δ2 = 2 − 1.5 = 0.5; δ1 = 0 + 0.9·1.5 − 1.0 = 0.35; δ0 = 1 + 0.9·1.0 − 0.5 = 1.4
    # A2 = 0.5; A1 = 0.35 + 0.9·0.5 = 0.8; A0 = 1.4 + 0.9·0.8 = 2.12
    # returns = [2.62, 1.8, 2.0], which with λ = 1 are the discounted returns:
    # 2; 0 + 0.9·2 = 1.8; 1 + 0.9·1.8 = 2.62
    adv, ret = gae(t([REWARDS]), t([VALUES]), t([[1, 1, 1]]), gamma=0.9, lam=1.0)
    assert adv.tolist()[0] == pytest.approx([2.12, 0.8, 0.5])
    assert ret.tolist()[0] == pytest.approx([2.62, 1.8, 2.0])


def test_gae_rows_of_different_lengths():
    # Row 0: the 3-token episode above, padded; row 1: rewards [0, 1], values [0.2, 0.4].
    # Padding holds garbage, which must neither show nor leak into the real tokens.
    rewards = t([REWARDS + [9.0], [0.0, 1.0, 9.0, NAN]])
    values = t([VALUES + [7.0], [0.2, 0.4, NAN, 7.0]]).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 1: δ1 = 1 + 0 − 0.4 = 0.6; δ0 = 0 + 0.4 − 0.2 = 0.2; A1 = 0.6; A0 = 0.2 + 0.95·0.6 = 0.77
    # returns = [0.97, 1.0]
    assert adv.tolist()[0] == pytest.approx([2.42625, 0.975, 0.5, 0.0])
    assert ret.tolist()[0] == pytest.approx([2.92625, 1.975, 2.0, 0.0])
    assert adv.tolist()[1] == pytest.approx([0.77, 0.6, 0.0, 0.0])
    assert ret.tolist()[1] == pytest.approx([0.97, 1.0, 0.0, 0.0])
    assert not adv.requires_grad and not ret.requires_grad  # targets, no graph


# ---- whitening and explained variance --------------------------------------------------------


def test_whiten_over_real_tokens_only():
    x, mask = t([[1.0, 2.0, 3.0], [4.0, 100.0, NAN]]), t([[1, 1, 1], [1, 0, 0]])
    # real tokens 1, 2, 3, 4: mean 2.5, variance (2.25 + 0.25 + 0.25 + 2.25)/4 = 1.25
    s = math.sqrt(1.25)
    out = whiten(x, mask)
    assert out.tolist()[0] == pytest.approx([-1.5 / s, -0.5 / s, 0.5 / s])
    assert out.tolist()[1] == pytest.approx([1.5 / s, 0.0, 0.0])
    real = out[mask.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert real.var(unbiased=False).item() == pytest.approx(1.0, rel=1e-6)
    kept = whiten(x, mask, shift_mean=False)  # (x − 2.5)/s + 2.5: mean kept, variance 1
    assert kept.tolist()[1] == pytest.approx([1.5 / s + 2.5, 0.0, 0.0])
    assert kept[mask.bool()].mean().item() == pytest.approx(2.5)


def test_explained_variance_by_hand():
    returns, mask = t([[1.0, 2.0, 3.0], [4.0, NAN, 0.0]]), t([[1, 1, 1], [1, 0, 0]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.zeros_like(returns), returns, mask) == pytest.approx(0.0)
    # Var[R] = 1.25; R − V = [−1, 1, −1, 1], variance 1: 1 − 1/1.25 = 0.2
    values = returns + t([[1.0, -1.0, 1.0], [-1.0, 5.0, 5.0]])
    assert explained_variance(values, returns, mask) == pytest.approx(0.2)
    assert math.isnan(explained_variance(values, torch.full_like(returns, 3.0), mask))


# ---- the clipped policy loss -----------------------------------------------------------------

# Four real tokens, ε = 0.2, and a padding token holding garbage:
#   ratio 1.5, A = 2:  −A·r = −3, −A·clip = −2.4 → max −2.4 (clipped, gradient 0)
#   ratio 0.5, A = −1: −A·r = 0.5, −A·clip = 0.8 → max 0.8 (clipped, gradient 0)
#   ratio 1.1, A = 3:  both −3.3 → −3.3 (inside, gradient −A·r = −3.3)
#   ratio 1.5, A = −1: −A·r = 1.5, −A·clip = 1.2 → max 1.5 (unclipped, gradient −A·r = 1.5)
RATIOS, ADVANTAGES = [1.5, 0.5, 1.1, 1.5], [2.0, -1.0, 3.0, -1.0]


def _policy_case():
    old = t([[-1.0, -2.0, -0.5, -3.0, NAN]])
    logps = (old.nan_to_num(0.0) + t([[math.log(r) for r in RATIOS] + [0.0]])).requires_grad_()
    return logps, old, t([ADVANTAGES + [NAN]]), t([[1, 1, 1, 1, 0]])


def test_clipped_policy_loss_branches_gradients_and_metrics():
    logps, old, adv, mask = _policy_case()
    loss, metrics = clipped_policy_loss(logps, old, adv, mask, clip_eps=0.2)
    # (−2.4 + 0.8 − 3.3 + 1.5)/4 = −3.4/4 = −0.85
    assert loss.item() == pytest.approx(-0.85)
    loss.backward()
    # d/dlogp of −A·e^{logp − old} is −A·r; divided by the 4 tokens
    assert logps.grad.tolist()[0] == pytest.approx([0.0, 0.0, -3.3 / 4, 1.5 / 4, 0.0])
    assert metrics["clipfrac"] == pytest.approx(2 / 4)
    # approx_kl = mean of k3 = (r − 1) − log r over the four tokens
    k3 = [(r - 1) - math.log(r) for r in RATIOS]
    assert metrics["approx_kl"] == pytest.approx(sum(k3) / 4)
    assert all(isinstance(v, float) for v in metrics.values())


def test_clipped_policy_loss_on_policy_is_minus_mean_advantage():
    logps = t([[-1.0, -2.0, -3.0]]).requires_grad_()
    loss, metrics = clipped_policy_loss(logps, logps.detach(), t([[1.0, 2.0, 6.0]]), t([[1, 1, 1]]), 0.2)
    assert loss.item() == pytest.approx(-3.0)  # ratio 1: −(1 + 2 + 6)/3
    assert metrics == {"clipfrac": 0.0, "approx_kl": 0.0}


def test_explicit_denominator_makes_pieces_sum_to_the_whole():
    logps, old, adv, mask = _policy_case()
    # a second row with one real token: ratio 1.1, A = 3 → −3.3
    logps2 = torch.cat([logps.detach(), t([[math.log(1.1), 0, 0, 0, 0]])]).requires_grad_()
    old2, adv2 = torch.cat([old, t([[0.0] * 5])]), torch.cat([adv, t([[3.0, 0, 0, 0, 0]])])
    mask2 = torch.cat([mask, t([[1, 0, 0, 0, 0]])])
    whole, _ = clipped_policy_loss(logps2, old2, adv2, mask2, 0.2)
    # (−3.4 − 3.3)/5 = −1.34
    assert whole.item() == pytest.approx(-1.34)
    (grad_whole,) = torch.autograd.grad(whole, logps2)

    def row(i, **kw):
        return clipped_policy_loss(logps2[i : i + 1], old2[i : i + 1], adv2[i : i + 1], mask2[i : i + 1], 0.2, **kw)[0]

    pieces = [row(i, denominator=5) for i in range(2)]
    assert sum(p.item() for p in pieces) == pytest.approx(whole.item())
    (grad_pieces,) = torch.autograd.grad(sum(pieces), logps2)
    assert torch.allclose(grad_pieces, grad_whole)
    # without it each piece is its own token mean: −0.85 − 3.3 ≠ −1.34
    own = [row(i) for i in range(2)]
    assert sum(p.item() for p in own) == pytest.approx(-0.85 - 3.3)


# ---- the clipped value loss ------------------------------------------------------------------


def test_clipped_value_loss_by_hand():
    # ε = 0.2; per token ½·max((V − R)², (clip(V, V_old ± 0.2) − R)²):
    #   V 1.0, V_old 0.5, R 1.2:  clip 0.7; 0.04 vs 0.25 → clipped, ½·0.25 = 0.125, gradient 0
    #   V 1.0, V_old 0.9, R 0.0:  clip 1.0; 1 vs 1 → not clipped, 0.5, gradient V − R = 1
    #   V 0.0, V_old 0.5, R −1.0: clip 0.3; 1 vs 1.69 → clipped, 0.845, gradient 0
    #   V 2.0, V_old 1.0, R 0.0:  clip 1.2; 4 vs 1.44 → unclipped, 2.0, gradient V − R = 2
    values = t([[1.0, 1.0, 0.0, 2.0, NAN]]).requires_grad_()
    old, returns = t([[0.5, 0.9, 0.5, 1.0, NAN]]), t([[1.2, 0.0, -1.0, 0.0, NAN]])
    loss, metrics = clipped_value_loss(values, old, returns, t([[1, 1, 1, 1, 0]]), clip_eps=0.2)
    # (0.125 + 0.5 + 0.845 + 2.0)/4 = 3.47/4 = 0.8675
    assert loss.item() == pytest.approx(0.8675)
    assert metrics == {"vf_clipfrac": pytest.approx(0.5)}
    loss.backward()
    assert values.grad.tolist()[0] == pytest.approx([0.0, 1 / 4, 0.0, 2 / 4, 0.0])
    half, _ = clipped_value_loss(values, old, returns, t([[1, 1, 1, 1, 0]]), 0.2, denominator=8)
    assert half.item() == pytest.approx(3.47 / 8)


# ---- critic-free advantages ------------------------------------------------------------------


def test_rloo_by_hand():
    # K = 2: [1, 3] → [1 − 3, 3 − 1]; [0, 0] → [0, 0]
    assert rloo_advantages(t([1.0, 3.0, 0.0, 0.0]), 2).tolist() == pytest.approx([-2.0, 2.0, 0.0, 0.0])
    # K = 4: [1, 2, 3, 6], sum 12: 1 − 11/3, 2 − 10/3, 3 − 9/3, 6 − 6/3
    assert rloo_advantages(t([1.0, 2.0, 3.0, 6.0]), 4).tolist() == pytest.approx([-8 / 3, -4 / 3, 0.0, 4.0])
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(t([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="flat"):
        rloo_advantages(t([1.0, 2.0, 3.0]), 2)


def test_grpo_by_hand():
    # K = 2: [1, 3], mean 2, unbiased std √((1 + 1)/1) = √2 → ∓1/√2
    got = grpo_advantages(t([1.0, 3.0]), 2, eps=0.0).tolist()
    assert got == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2)])
    # K = 4: [1, 2, 3, 6], mean 3, deviations [−2, −1, 0, 3], unbiased var 14/3
    s = math.sqrt(14 / 3)
    got = grpo_advantages(t([1.0, 2.0, 3.0, 6.0]), 4, eps=0.0).tolist()
    assert got == pytest.approx([-2 / s, -1 / s, 0.0, 3 / s])
    # a group of equal scores: 0/(0 + eps) = 0 with the default eps, next to a normal group
    got = grpo_advantages(t([5.0, 5.0, 5.0, 5.0, 1.0, 2.0, 3.0, 6.0]), 4).tolist()
    assert got[:4] == [0.0] * 4
    assert got[4:] == pytest.approx([-2 / s, -1 / s, 0.0, 3 / s], rel=1e-5)
    assert grpo_advantages(t([1.0, 2.0, 3.0, 6.0]), 4, scale=False).tolist() == pytest.approx([-2, -1, 0, 3])
    with pytest.raises(ValueError, match="k >= 2"):
        grpo_advantages(t([1.0, 2.0]), 1)


def test_sequence_to_tokens():
    got = sequence_to_tokens(t([2.0, -1.0]), torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert got.tolist() == [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]


# ---- KL controllers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kl", "factor"),
    [
        (12.0, 1 + 0.2 * 100 / 10000),  # KL/target − 1 = 1, clipped to 0.2
        (6.0, 1.0),  # on target
        (6.6, 1 + 0.1 * 100 / 10000),  # 0.1, inside the clip
        (0.0, 1 - 0.2 * 100 / 10000),  # −1, clipped to −0.2
    ],
)
def test_adaptive_kl_controller_by_hand(kl, factor):
    controller = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10000)
    controller.update(kl, n_steps=100)
    assert controller.coef == pytest.approx(0.1 * factor, rel=1e-12)


def test_controller_state_round_trip_and_factory():
    a = kl_controller(0.1, target=6.0)
    assert isinstance(a, AdaptiveKLController) and a.horizon == 10000
    for kl in (9.0, 3.0, 7.0):
        a.update(kl, 256)
    b = kl_controller(0.5, target=1.0, horizon=3)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for kl in (12.0, 0.5, 6.3):
        a.update(kl, 256)
        b.update(kl, 256)
        assert b.coef == a.coef  # exactly
    fixed = kl_controller(0.05)
    assert isinstance(fixed, FixedKLController)
    fixed.update(100.0, 256)
    assert fixed.coef == 0.05
    other = FixedKLController(0.3)
    other.load_state_dict(json.loads(json.dumps(fixed.state_dict())))
    assert other.coef == 0.05
    with pytest.raises(ValueError, match="cannot load"):
        other.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="must be > 0"):
        kl_controller(0.1, target=0.0)

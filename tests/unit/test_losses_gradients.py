"""Gradients: each loss moves the chosen and rejected log-probs the way its paper says.

Gradient descent moves a log-prob against its gradient: dL/dπc < 0 raises the chosen
completion's likelihood, dL/dπr > 0 lowers the rejected one's.
"""

from __future__ import annotations

import math

import pytest
import torch

from prefopt.losses import GPO_FUNCTIONS, GPO_SCORES, PAIRWISE_LOSSES, pairwise_loss, unpaired_loss


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def grads(name, rho_c, rho_r, *, lc=4.0, lr=5.0, pc=-20.0, pr=-30.0, **params):
    """(dL/dπc, dL/dπr) for one pair with log-ratios ρc, ρr (reference = π − ρ)."""
    policy_c = torch.tensor([pc], requires_grad=True)
    policy_r = torch.tensor([pr], requires_grad=True)
    out = pairwise_loss(
        name,
        policy_chosen_logps=policy_c,
        policy_rejected_logps=policy_r,
        ref_chosen_logps=torch.tensor([pc - rho_c]),
        ref_rejected_logps=torch.tensor([pr - rho_r]),
        chosen_lengths=torch.tensor([lc]),
        rejected_lengths=torch.tensor([lr]),
        **params,
    )
    gc, gr = torch.autograd.grad(out.loss, [policy_c, policy_r])
    return gc.item(), gr.item()


# Losses whose every point moves the chosen log-prob up and the rejected one down.
MONOTONE = ["dpo", "robust", "bco_pair", "apo_zero", "simpo", "cpo", "orpo", "gpo"]
POINTS = [(0.0, 0.0), (3.0, -2.0), (-4.0, 6.0), (15.0, 15.0), (-8.0, -30.0)]


@pytest.mark.parametrize("name", MONOTONE)
@pytest.mark.parametrize(("rho_c", "rho_r"), POINTS)
def test_chosen_up_rejected_down(name, rho_c, rho_r):
    gc, gr = grads(name, rho_c, rho_r)
    assert gc < 0 < gr


def test_dpo_gradient_closed_form():
    # L = −log σ(βΔ) ⇒ dL/dπc = −β·σ(−βΔ) = −dL/dπr. At Δ = 0, β = 0.1: −0.05.
    assert grads("dpo", 0.0, 0.0) == pytest.approx((-0.05, 0.05))
    # Δ = 3 − (−2) = 5, βΔ = 0.5.
    assert grads("dpo", 3.0, -2.0) == pytest.approx((-0.1 * sig(-0.5), 0.1 * sig(-0.5)))
    # RPO: sft_weight·(−πc/Lc) adds −sft_weight/Lc = −0.5/4 to dL/dπc.
    gc, gr = grads("dpo", 0.0, 0.0, sft_weight=0.5)
    assert (gc, gr) == pytest.approx((-0.05 - 0.125, 0.05))


def test_hinge_stops_once_margin_is_met():
    # max(0, 1 − βΔ): slope −β below βΔ = 1, zero above.
    assert grads("hinge", 0.0, 0.0) == pytest.approx((-0.1, 0.1))
    assert grads("hinge", 8.0, -8.0) == (0.0, 0.0)  # βΔ = 1.6 > 1


def test_ipo_pulls_margin_back_to_its_target():
    # (h − 1/(2β))², h = ρc/Lc − ρr/Lr: dL/dπc = 2(h − 5)/Lc.
    gc, gr = grads("ipo", 0.0, 0.0)  # h = 0 < 5: widen the margin
    assert (gc, gr) == pytest.approx((2 * (0 - 5) / 4, -2 * (0 - 5) / 5))
    gc, gr = grads("ipo", 40.0, 0.0)  # h = 10 > 5: IPO's regularisation narrows it
    assert (gc, gr) == pytest.approx((2 * (10 - 5) / 4, -2 * (10 - 5) / 5))
    assert gc > 0 > gr


def test_sppo_hard_moves_each_log_ratio_to_its_own_target():
    # (ρc − 5)² + (ρr + 5)²: gradients 2(ρc − 5) and 2(ρr + 5).
    assert grads("sppo_hard", 0.0, 0.0) == pytest.approx((-10.0, 10.0))
    assert grads("sppo_hard", 8.0, -9.0) == pytest.approx((6.0, -8.0))  # both overshot


def test_nca_pair_raises_chosen_only_up_to_its_optimum():
    # d/dρc of −log σ(βρc) − ½ log σ(−βρc) = β(−(1 − σ) + ½σ), σ = σ(βρc): zero at
    # σ = 2/3, i.e. βρc = ln 2. Below it the chosen goes up, above it back down; the
    # rejected term −½ log σ(−βρr) always pushes the rejected down.
    slope = lambda x: 0.1 * (-(1 - sig(x)) + 0.5 * sig(x))  # noqa: E731
    for rho_c, rho_r in [(0.0, 0.0), (5.0, -20.0), (15.0, 15.0), (-30.0, 3.0)]:
        gc, gr = grads("nca_pair", rho_c, rho_r)
        assert gc == pytest.approx(slope(0.1 * rho_c), abs=1e-7)
        assert gr > 0
    assert grads("nca_pair", 5.0, 0.0)[0] < 0 < grads("nca_pair", 9.0, 0.0)[0]  # ln 2 / 0.1 = 6.93


def test_apo_down_lowers_both_rejected_faster():
    # σ(βρc) + 1 − σ(βΔ): dL/dπc = β(σ'(βρc) − σ'(βΔ)), dL/dπr = β·σ'(βΔ), σ' = σ(1 − σ).
    d = lambda x: sig(x) * (1 - sig(x))  # noqa: E731
    gc, gr = grads("apo_down", 0.0, 0.0)
    assert (gc, gr) == pytest.approx((0.0, 0.1 * d(0.0)), abs=1e-9)
    gc, gr = grads("apo_down", 0.0, -2.0)  # βρc = 0, βΔ = 0.2
    assert (gc, gr) == pytest.approx((0.1 * (d(0.0) - d(0.2)), 0.1 * d(0.2)), abs=1e-8)
    assert 0 < gc < gr


@pytest.mark.parametrize(("rho_c", "rho_r"), [(10.0, 0.0), (0.0, 10.0), (-30.0, 20.0), (40.0, -5.0)])
def test_discopop_chosen_up_rejected_down_away_from_zero(rho_c, rho_r):
    gc, gr = grads("discopop", rho_c, rho_r)  # βΔ = ±1, −5, 4.5
    assert gc < 0 < gr


def test_discopop_has_a_bump_at_zero():
    # The published DiscoPOP loss is not monotone: f(z) = (1 − m)·(−log σ z) + m·e^−z with
    # m = σ(z/τ) has f'(0) = (1 − ln 2)/(4τ) − 3/4 = 0.784 at τ = 0.05 (> 0 for τ < 0.102),
    # so from policy = reference its first step narrows the margin. dL/dπc = β·f'(0).
    fprime = (1 - math.log(2)) / (4 * 0.05) - 0.75
    assert grads("discopop", 0.0, 0.0) == pytest.approx((0.1 * fprime, -0.1 * fprime))


@pytest.mark.parametrize("function", list(GPO_FUNCTIONS))
@pytest.mark.parametrize("score", GPO_SCORES)
def test_every_gpo_spec_prefers_chosen_at_zero_margin(function, score):
    # Every f is decreasing at x = 0, for every score.
    gc, gr = grads("gpo", 0.0, 0.0, pc=-12.0, pr=-12.0, lc=4.0, lr=4.0, function=function, score=score)
    assert gc < 0 < gr


def test_orpo_gradient_includes_nll():
    # ORPO = −πc/Lc + λ·(...): even with λ → tiny, dL/dπc → −1/Lc.
    gc, gr = grads("orpo", 0.0, 0.0, beta=1e-8)
    assert gc == pytest.approx(-1 / 4, rel=1e-6)
    assert gr == pytest.approx(0.0, abs=1e-7)


def test_kto_moves_desirable_up_and_undesirable_down():
    policy = torch.tensor([-5.0, -7.0, -6.0, -9.0], requires_grad=True)
    desirable = torch.tensor([True, False, True, False])
    out = unpaired_loss(
        "kto",
        policy_logps=policy,
        ref_logps=torch.tensor([-6.0, -6.0, -6.0, -9.0]),
        desirable=desirable,
        kl_policy_logps=torch.tensor([-5.0, -6.0]),
        kl_ref_logps=torch.tensor([-6.0, -6.0]),
    )
    (g,) = torch.autograd.grad(out.loss, [policy])
    assert (g[desirable] < 0).all() and (g[~desirable] > 0).all()
    # Desirable ρ = 1, z = 0.5: d/dπ of (1/4)·σ(β(z − ρ)) = −(β/4)·σ'(β(z − ρ)).
    x = 0.1 * (0.5 - 1.0)
    assert g[0].item() == pytest.approx(-0.1 / 4 * sig(x) * (1 - sig(x)))


def test_kto_kl_term_carries_no_gradient():
    kl_policy = torch.tensor([-4.0, -6.0, -6.5], requires_grad=True)
    kw = {
        "policy_logps": torch.tensor([-5.0, -7.0, -6.0], requires_grad=True),
        "ref_logps": torch.tensor([-6.0, -6.0, -6.0]),
        "desirable": torch.tensor([True, False, True]),
        "kl_ref_logps": torch.tensor([-6.0, -6.0, -6.0]),
    }
    out = unpaired_loss("kto", kl_policy_logps=kl_policy, **kw)
    (g,) = torch.autograd.grad(out.loss, [kl_policy], allow_unused=True)
    assert g is None  # detached: the estimate shifts the reference point only
    # ...yet it is used: a larger KL estimate changes the loss.
    shifted = unpaired_loss("kto", kl_policy_logps=kl_policy.detach() + 1.0, **kw)
    assert shifted.loss.item() != pytest.approx(out.loss.item())


CHECK_POINT = {
    "policy_chosen_logps": [-10.0, -8.0, -31.0],
    "policy_rejected_logps": [-12.0, -6.0, -40.0],
    "ref_chosen_logps": [-11.0, -9.5, -30.0],
    "ref_rejected_logps": [-11.0, -8.0, -35.0],
}


@pytest.mark.parametrize(
    ("name", "params"),
    [(n, {}) for n in PAIRWISE_LOSSES]
    + [("gpo", {"function": f, "score": s, "gamma": 0.3}) for f in GPO_FUNCTIONS for s in GPO_SCORES]
    + [("gpo", {"function": "exponential", "beta": 30.0})],  # pair 1 at x = −15, on the tangent
)
def test_autograd_matches_finite_differences(name, params):
    # Guards the hand-written stable forms (log1mexp branches, the exponential tangent,
    # DiscoPOP's log-space product) against a wrong or NaN backward.
    inputs = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in CHECK_POINT.values()]
    lengths = {"chosen_lengths": torch.tensor([4, 2, 7]), "rejected_lengths": torch.tensor([5, 3, 7])}

    def f(*tensors):
        return pairwise_loss(name, **dict(zip(CHECK_POINT, tensors, strict=True)), **lengths, **params).per_example

    assert torch.autograd.gradcheck(f, inputs)

"""Loss values against closed forms worked out by hand from the papers (each cited in docs/losses.md).

Two pairs, in nats (π policy, r reference, L completion tokens):
  pair 0: πc=−10, πr=−12, rc=−11, rr=−11, Lc=4, Lr=5  →  ρc=1, ρr=−1, Δ=2
          per token: ρc/Lc=0.25, ρr/Lr=−0.2 (IPO h=0.45); πc/Lc=−2.5, πr/Lr=−2.4
  pair 1: πc=−8,  πr=−6,  rc=−9,  rr=−8,  Lc=2, Lr=3  →  ρc=1, ρr=2,  Δ=−1
          per token: ρc/Lc=0.5, ρr/Lr=2/3 (IPO h=−1/6); πc/Lc=−4, πr/Lr=−2
Expected values are written with math and these literal numbers, never with prefopt code.
"""

from __future__ import annotations

import math

import pytest
import torch

from prefopt.losses import pairwise_loss, unpaired_loss

LN2 = math.log(2.0)


def nls(x: float) -> float:
    """−log σ(x) = log(1 + e^−x)."""
    return math.log(1.0 + math.exp(-x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def log_odds(mean_logp: float) -> float:
    """ORPO's ℓ = log(p / (1 − p)) for p = e^mean_logp."""
    p = math.exp(mean_logp)
    return math.log(p / (1.0 - p))


BATCH = {
    "policy_chosen_logps": torch.tensor([-10.0, -8.0]),
    "policy_rejected_logps": torch.tensor([-12.0, -6.0]),
    "ref_chosen_logps": torch.tensor([-11.0, -9.0]),
    "ref_rejected_logps": torch.tensor([-11.0, -8.0]),
    "chosen_lengths": torch.tensor([4, 2]),
    "rejected_lengths": torch.tensor([5, 3]),
}

CASES = [
    # dpo, β=0.1: βΔ = 0.2 and −0.1.
    ("dpo", {}, [nls(0.2), nls(-0.1)]),
    # dpo, β=0.5: βΔ = 1.0 and −0.5.
    ("dpo", {"beta": 0.5}, [nls(1.0), nls(-0.5)]),
    # conservative DPO, ε=0.1: 0.9·(−log σ(βΔ)) + 0.1·(−log σ(−βΔ)).
    ("dpo", {"label_smoothing": 0.1}, [0.9 * nls(0.2) + 0.1 * nls(-0.2), 0.9 * nls(-0.1) + 0.1 * nls(0.1)]),
    # RPO = dpo + 0.5·(−πc/Lc): −πc/Lc = 10/4 = 2.5 and 8/2 = 4.
    ("dpo", {"sft_weight": 0.5}, [nls(0.2) + 0.5 * 2.5, nls(-0.1) + 0.5 * 4.0]),
    # robust, default ε=0.1: [0.9·(−log σ(βΔ)) − 0.1·(−log σ(−βΔ))] / 0.8.
    ("robust", {}, [(0.9 * nls(0.2) - 0.1 * nls(-0.2)) / 0.8, (0.9 * nls(-0.1) - 0.1 * nls(0.1)) / 0.8]),
    # robust, β=1, ε=0.25: βΔ = 2 and −1, divided by 1 − 0.5 = 0.5.
    ("robust", {"beta": 1.0, "label_smoothing": 0.25},
     [(0.75 * nls(2.0) - 0.25 * nls(-2.0)) / 0.5, (0.75 * nls(-1.0) - 0.25 * nls(1.0)) / 0.5]),
    # hinge, β=0.1: max(0, 1 − 0.2) = 0.8; max(0, 1 + 0.1) = 1.1.
    ("hinge", {}, [0.8, 1.1]),
    # hinge, β=1: max(0, 1 − 2) = 0; max(0, 1 + 1) = 2.
    ("hinge", {"beta": 1.0}, [0.0, 2.0]),
    # ipo, β=0.1 (1/(2β) = 5): (0.45 − 5)² = 20.7025; (−1/6 − 5)² = (31/6)².
    ("ipo", {}, [20.7025, (31.0 / 6.0) ** 2]),
    # ipo, β=0.5 (1/(2β) = 1): (0.45 − 1)² = 0.3025; (−1/6 − 1)² = (7/6)².
    ("ipo", {"beta": 0.5}, [0.3025, (7.0 / 6.0) ** 2]),
    # nca_pair, β=0.1: βρc = 0.1, 0.1; βρr = −0.1, 0.2.
    # −log σ(βρc) − ½ log σ(−βρc) − ½ log σ(−βρr)
    ("nca_pair", {}, [nls(0.1) + 0.5 * nls(-0.1) + 0.5 * nls(0.1),
                      nls(0.1) + 0.5 * nls(-0.1) + 0.5 * nls(-0.2)]),
    # bco_pair: −log σ(βρc) − log σ(−βρr).
    ("bco_pair", {}, [nls(0.1) + nls(0.1), nls(0.1) + nls(-0.2)]),
    # sppo_hard, β=0.1: (1 − 5)² + (−1 + 5)² = 32; (1 − 5)² + (2 + 5)² = 65.
    ("sppo_hard", {}, [32.0, 65.0]),
    # sppo_hard, β=0.5: (1 − 1)² + (−1 + 1)² = 0; (1 − 1)² + (2 + 1)² = 9.
    ("sppo_hard", {"beta": 0.5}, [0.0, 9.0]),
    # apo_zero: 1 − σ(βρc) + σ(βρr).
    ("apo_zero", {}, [1 - sig(0.1) + sig(-0.1), 1 - sig(0.1) + sig(0.2)]),
    # apo_down: σ(βρc) + 1 − σ(βΔ).
    ("apo_down", {}, [sig(0.1) + 1 - sig(0.2), sig(0.1) + 1 - sig(-0.1)]),
    # discopop, τ=0.05: z = 0.2 → m = σ(4); z = −0.1 → m = σ(−2).
    ("discopop", {}, [(1 - sig(4.0)) * nls(0.2) + sig(4.0) * math.exp(-0.2),
                      (1 - sig(-2.0)) * nls(-0.1) + sig(-2.0) * math.exp(0.1)]),
    # discopop, β=1, τ=0.5: z = 2 → m = σ(4); z = −1 → m = σ(−2).
    ("discopop", {"beta": 1.0, "tau": 0.5}, [(1 - sig(4.0)) * nls(2.0) + sig(4.0) * math.exp(-2.0),
                                             (1 - sig(-2.0)) * nls(-1.0) + sig(-2.0) * math.exp(1.0)]),
    # simpo, β=2, γ=1: 2·(−2.5 + 2.4) − 1 = −1.2; 2·(−4 + 2) − 1 = −5.
    ("simpo", {}, [nls(-1.2), nls(-5.0)]),
    # simpo, β=1, γ=0: −0.1 and −2.
    ("simpo", {"beta": 1.0, "gamma": 0.0}, [nls(-0.1), nls(-2.0)]),
    # cpo, β=0.1, α=1: πc − πr = 2 and −2; NLL 2.5 and 4.
    ("cpo", {}, [nls(0.2) + 2.5, nls(-0.2) + 4.0]),
    ("cpo", {"sft_weight": 0.0}, [nls(0.2), nls(-0.2)]),
    # orpo, λ=0.1: p̄c, p̄r = −2.5, −2.4 and −4, −2.
    ("orpo", {}, [2.5 + 0.1 * nls(log_odds(-2.5) - log_odds(-2.4)),
                  4.0 + 0.1 * nls(log_odds(-4.0) - log_odds(-2.0))]),
    ("orpo", {"beta": 1.0}, [2.5 + nls(log_odds(-2.5) - log_odds(-2.4)),
                             4.0 + nls(log_odds(-4.0) - log_odds(-2.0))]),
    # gpo default = dpo.
    ("gpo", {}, [nls(0.2), nls(-0.1)]),
    # gpo exponential: e^−βΔ.
    ("gpo", {"function": "exponential"}, [math.exp(-0.2), math.exp(0.1)]),
    # gpo truncated squared: max(0, 1 − βΔ)².
    ("gpo", {"function": "truncated_squared"}, [0.8**2, 1.1**2]),
    # gpo savage: σ(−βΔ)².
    ("gpo", {"function": "savage"}, [sig(-0.2) ** 2, sig(0.1) ** 2]),
    # gpo squared on per-token log-ratios, β=1, γ=0.5: x = 0.45 − 0.5 = −0.05 → (x − 1)² = 1.1025;
    # x = −1/6 − 0.5 = −2/3 → (−5/3)² = 25/9.
    ("gpo", {"function": "squared", "score": "avg_logratio", "beta": 1.0, "gamma": 0.5}, [1.1025, 25.0 / 9.0]),
    # gpo hinge on per-token log-probs, β=1: 1 − (−2.5 + 2.4) = 1.1; 1 − (−4 + 2) = 3.
    ("gpo", {"function": "hinge", "score": "avg_logp", "beta": 1.0}, [1.1, 3.0]),
    # gpo logistic on summed log-probs, β=0.1, γ=0.3: 0.2 − 0.3 = −0.1; −0.2 − 0.3 = −0.5.
    ("gpo", {"score": "sum_logp", "gamma": 0.3}, [nls(-0.1), nls(-0.5)]),
]


@pytest.mark.parametrize(("name", "params", "expected"), CASES, ids=lambda v: str(v)[:40])
def test_pairwise_value_matches_closed_form(name, params, expected):
    out = pairwise_loss(name, **BATCH, **params)
    assert out.per_example.shape == (2,)
    assert out.per_example.dtype == torch.float32
    torch.testing.assert_close(out.per_example, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert out.loss.item() == pytest.approx(sum(expected) / 2, rel=1e-5, abs=1e-6)
    assert out.metrics["loss"] == pytest.approx(sum(expected) / 2, rel=1e-5, abs=1e-6)


def test_metrics_reference_based():
    m = pairwise_loss("dpo", **BATCH).metrics
    assert all(type(v) is float for v in m.values())
    # rewards = β·ρ: chosen (0.1, 0.1), rejected (−0.1, 0.2).
    assert m["rewards/chosen"] == pytest.approx(0.1)
    assert m["rewards/rejected"] == pytest.approx(0.05)
    assert m["rewards/margins"] == pytest.approx(0.05)
    assert m["rewards/accuracies"] == 0.5  # 1 > −1 yes, 1 > 2 no
    assert m["logps/chosen"] == -9.0  # (−10 − 8) / 2
    assert m["logps/rejected"] == -9.0  # (−12 − 6) / 2
    assert "nll" not in m


def test_metrics_reference_free_use_beta_times_mean_logp():
    m = pairwise_loss("simpo", **BATCH).metrics
    # β·π/L with β=2: chosen (−5, −8), rejected (−4.8, −4).
    assert m["rewards/chosen"] == pytest.approx(-6.5)
    assert m["rewards/rejected"] == pytest.approx(-4.4)
    assert m["rewards/margins"] == pytest.approx(-2.1)
    assert m["rewards/accuracies"] == 0.0
    assert pairwise_loss("cpo", **BATCH).metrics["nll"] == pytest.approx(3.25)  # (2.5 + 4) / 2


POLICY_EQUALS_REFERENCE = {
    "policy_chosen_logps": torch.tensor([-3.7, -120.25, -0.5]),
    "policy_rejected_logps": torch.tensor([-41.0, -7.5, -250.0]),
    "ref_chosen_logps": torch.tensor([-3.7, -120.25, -0.5]),
    "ref_rejected_logps": torch.tensor([-41.0, -7.5, -250.0]),
    "chosen_lengths": torch.tensor([2, 50, 1]),
    "rejected_lengths": torch.tensor([9, 3, 77]),
}


@pytest.mark.parametrize(
    ("name", "params", "expected"),
    [
        ("dpo", {}, LN2),  # −log σ(0)
        ("dpo", {"beta": 5.0, "label_smoothing": 0.2}, LN2),
        ("robust", {}, LN2),  # (0.9 ln 2 − 0.1 ln 2) / 0.8
        ("hinge", {}, 1.0),
        ("ipo", {}, 25.0),  # (0 − 1/(2·0.1))²
        ("nca_pair", {}, 2 * LN2),  # ln 2 + ½ ln 2 + ½ ln 2
        ("bco_pair", {}, 2 * LN2),
        ("sppo_hard", {}, 50.0),  # 5² + 5²
        ("apo_zero", {}, 1.0),  # 1 − ½ + ½
        ("apo_down", {}, 1.0),  # ½ + 1 − ½
        ("discopop", {}, 0.5 * LN2 + 0.5),  # m = ½: ½·ln 2 + ½·e⁰
        ("gpo", {}, LN2),
        ("gpo", {"function": "squared", "score": "avg_logratio"}, 1.0),  # (0 − 1)²
    ],
)
def test_policy_equal_to_reference(name, params, expected):
    # The invariant of docs/losses.md: with the policy initialised from the reference, Δ = 0 and the
    # first DPO loss is ln 2 = 0.693147; every reference-based loss has such a value.
    out = pairwise_loss(name, **POLICY_EQUALS_REFERENCE, **params)
    torch.testing.assert_close(out.per_example, torch.full((3,), expected), rtol=1e-6, atol=1e-6)
    assert out.metrics["rewards/margins"] == 0.0
    assert out.metrics["rewards/accuracies"] == 0.0


def test_dpo_first_step_is_ln2():
    out = pairwise_loss("dpo", **POLICY_EQUALS_REFERENCE)
    assert abs(out.loss.item() - 0.693147) < 1e-4


# ------------------------------------------------------------------------------- presets


@pytest.mark.parametrize(
    ("name", "params", "gpo_params"),
    [
        ("dpo", {"beta": 0.3}, {"beta": 0.3}),
        ("hinge", {"beta": 0.3}, {"beta": 0.3, "function": "hinge"}),
        ("simpo", {"beta": 2.5, "gamma": 0.7},
         {"beta": 2.5, "gamma": 0.7, "score": "avg_logp"}),
        ("cpo", {"beta": 0.2, "sft_weight": 0.4},
         {"beta": 0.2, "score": "sum_logp", "sft_weight": 0.4}),
    ],
)
def test_named_losses_are_gpo_presets(name, params, gpo_params):
    named = pairwise_loss(name, **BATCH, **params)
    general = pairwise_loss("gpo", **BATCH, **gpo_params)
    torch.testing.assert_close(named.per_example, general.per_example)
    assert named.metrics == general.metrics


def test_ipo_is_gpo_squared_at_twice_beta_rescaled():
    # (h − 1/(2τ))² = (2τh − 1)² / (2τ)²: GPO squared with β = 2τ = 0.6, divided by 0.36.
    ipo = pairwise_loss("ipo", **BATCH, beta=0.3).per_example
    gpo = pairwise_loss("gpo", **BATCH, beta=0.6, function="squared", score="avg_logratio").per_example
    torch.testing.assert_close(ipo, gpo / 0.36)


# ---------------------------------------------------------------------------------- KTO

KTO_BATCH = {
    # ρ = π − r = (1, −1, 0); labels desirable, undesirable, desirable.
    "policy_logps": torch.tensor([-5.0, -7.0, -6.0]),
    "ref_logps": torch.tensor([-6.0, -6.0, -6.0]),
    "desirable": torch.tensor([True, False, True]),
    # mismatched pairs: log-ratios (1, 0, −0.5), mean 1/6 → z = 1/6.
    "kl_policy_logps": torch.tensor([-5.0, -6.0, -6.5]),
    "kl_ref_logps": torch.tensor([-6.0, -6.0, -6.0]),
}


def test_kto_value_matches_closed_form():
    z = 1.0 / 6.0
    expected = [
        1 - sig(0.1 * (1 - z)),  # desirable: 1 − σ(β(ρ − z))
        1 - sig(0.1 * (z + 1)),  # undesirable: 1 − σ(β(z − ρ)), ρ = −1
        1 - sig(0.1 * (0 - z)),  # desirable, ρ = 0
    ]
    out = unpaired_loss("kto", **KTO_BATCH)
    torch.testing.assert_close(out.per_example, torch.tensor(expected))
    assert out.loss.item() == pytest.approx(sum(expected) / 3, rel=1e-6)
    m = out.metrics
    assert m["kl"] == pytest.approx(z)
    assert m["rewards/chosen"] == pytest.approx(0.05)  # mean(0.1·1, 0.1·0)
    assert m["rewards/rejected"] == pytest.approx(-0.1)  # 0.1·(−1)
    assert m["rewards/margins"] == pytest.approx(0.15)
    assert m["logps/chosen"] == -5.5  # mean(−5, −6)
    assert m["logps/rejected"] == -7.0
    assert all(type(v) is float for v in m.values())


def test_kto_weights_and_beta():
    z = 1.0 / 6.0
    expected = [2.0 * (1 - sig(1 - z)), 0.5 * (1 - sig(z + 1)), 2.0 * (1 - sig(-z))]
    out = unpaired_loss("kto", **KTO_BATCH, beta=1.0, desirable_weight=2.0, undesirable_weight=0.5)
    torch.testing.assert_close(out.per_example, torch.tensor(expected))


def test_kto_reference_point_is_clamped_at_zero():
    # mismatched log-ratios (−1, 0) have mean −0.5 < 0, so z = max(0, −0.5) = 0.
    batch = {**KTO_BATCH, "kl_policy_logps": torch.tensor([-7.0, -6.0]), "kl_ref_logps": torch.tensor([-6.0, -6.0])}
    out = unpaired_loss("kto", **batch)
    expected = [1 - sig(0.1), 1 - sig(0.1), 1 - sig(0.0)]
    torch.testing.assert_close(out.per_example, torch.tensor(expected))
    assert out.metrics["kl"] == 0.0


def test_kto_metrics_leave_out_empty_groups():
    batch = {**KTO_BATCH, "desirable": torch.tensor([True, True, True])}
    m = unpaired_loss("kto", **batch).metrics
    assert m["rewards/chosen"] == pytest.approx(0.0)  # mean(0.1, −0.1, 0)
    assert "rewards/rejected" not in m and "rewards/margins" not in m

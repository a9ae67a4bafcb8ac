"""Numerical stability: extreme log-ratios stay finite, half-precision inputs give fp32 answers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from prefopt.losses import (
    GPO_FUNCTIONS,
    GPO_SCORES,
    PAIRWISE_LOSSES,
    log1mexp,
    needs_rejected,
    pairwise_loss,
    unpaired_loss,
)

ALL_PAIRWISE = (
    [(n, {}) for n in PAIRWISE_LOSSES]
    + [("dpo", {"label_smoothing": 0.2, "sft_weight": 1.0}), ("robust", {"label_smoothing": 0.45})]
    + [("gpo", {"function": f, "score": s}) for f in GPO_FUNCTIONS for s in GPO_SCORES]
)

# |log-ratio| = 1e4 in every sign combination, log-probs of exactly 0 (every token certain)
# and of −1e4 over one token (ORPO's log(1 − p) at both ends).
EXTREME = {
    #                       Δ=−2e4   Δ=+2e4   ρ=+1e4 both  ρ=−1e4 both   all zero
    "policy_chosen_logps": [-1e4, 0.0, 0.0, -1e4, 0.0],
    "policy_rejected_logps": [0.0, -1e4, 0.0, -1e4, 0.0],
    "ref_chosen_logps": [0.0, -1e4, -1e4, 0.0, 0.0],
    "ref_rejected_logps": [-1e4, 0.0, -1e4, 0.0, 0.0],
}
EXTREME_LENGTHS = {"chosen_lengths": [1, 1, 1000, 1, 1], "rejected_lengths": [1, 1, 1, 1000, 1]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("name", "params"), ALL_PAIRWISE, ids=lambda v: str(v)[:60])
def test_pairwise_finite_at_extreme_log_ratios(name, params, dtype):
    inputs = {k: torch.tensor(v, dtype=dtype, requires_grad=True) for k, v in EXTREME.items()}
    lengths = {k: torch.tensor(v) for k, v in EXTREME_LENGTHS.items()}
    out = pairwise_loss(name, **inputs, **lengths, **params)
    assert torch.isfinite(out.per_example).all(), out.per_example
    assert all(math.isfinite(v) for v in out.metrics.values()), out.metrics
    out.loss.backward()
    for key, t in inputs.items():
        # Reference-free losses skip refs; sft reads the chosen side only.
        if key == "policy_chosen_logps" or (key.startswith("policy") and needs_rejected(name)) or t.grad is not None:
            assert torch.isfinite(t.grad).all(), (key, t.grad)


def test_kto_finite_at_extreme_log_ratios():
    policy = torch.tensor([-1e4, 0.0, -1e4, 0.0], requires_grad=True)
    out = unpaired_loss(
        "kto",
        policy_logps=policy,
        ref_logps=torch.tensor([0.0, -1e4, 0.0, -1e4]),
        desirable=torch.tensor([True, True, False, False]),
        kl_policy_logps=torch.tensor([0.0, -1e4]),
        kl_ref_logps=torch.tensor([-1e4, -1e4]),  # KL estimate 5e3
    )
    out.loss.backward()
    assert torch.isfinite(out.per_example).all() and torch.isfinite(policy.grad).all()
    assert all(math.isfinite(v) for v in out.metrics.values())


def test_exponential_is_continued_by_its_tangent_below_minus_10():
    # GPO exponential f(x) = e^−x for x ≥ −10, e^10·(1 + (−10 − x)) below: finite, convex, C¹.
    # x = βΔ with β = 0.1 and Δ = −2e4, −150, −100, 50.
    pc = torch.tensor([-1e4, -100.0, -100.0, -100.0], requires_grad=True)
    out = pairwise_loss(
        "gpo",
        function="exponential",
        policy_chosen_logps=pc,
        policy_rejected_logps=torch.tensor([0.0, -100.0, -100.0, -100.0]),
        ref_chosen_logps=torch.tensor([0.0, -100.0, -100.0, -100.0]),
        ref_rejected_logps=torch.tensor([-1e4, -250.0, -200.0, -50.0]),
    )
    e10 = math.exp(10)
    expected = torch.tensor([e10 * (1 + 1990), e10 * (1 + 5), e10, math.exp(-5)])
    torch.testing.assert_close(out.per_example, expected, rtol=1e-5, atol=0)
    out.loss.backward()
    # slope −e^10 on the tangent, and −e^−x above it; times β, over B = 4.
    slopes = torch.tensor([-e10, -e10, -e10, -math.exp(-5)])
    torch.testing.assert_close(pc.grad, 0.1 * slopes / 4, rtol=1e-5, atol=0)


def test_orpo_with_certain_completions():
    # π = 0 (every token probability 1 in fp32): log(1 − p) = −inf unclamped.
    pc = torch.tensor([0.0, 0.0, -1e-9], requires_grad=True)
    pr = torch.tensor([0.0, -3.0, 0.0], requires_grad=True)
    out = pairwise_loss("orpo", policy_chosen_logps=pc, policy_rejected_logps=pr,
                        chosen_lengths=torch.tensor([5, 5, 5]), rejected_lengths=torch.tensor([5, 5, 5]))
    out.loss.backward()
    assert torch.isfinite(out.per_example).all()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    assert out.per_example[0].item() == pytest.approx(0.1 * math.log(2))  # equal log odds


@pytest.mark.parametrize(
    ("a", "expected"),
    [
        (-0.5, math.log(1 - math.exp(-0.5))),  # −0.932752
        (-math.log(2), math.log(0.5)),  # the branch point
        (-3.0, math.log(1 - math.exp(-3.0))),  # −0.0510692
        # near 0: log(1 − e^a) = log(−a) + a/2 + O(a²), where 1 − e^a cancels in fp32
        (-1e-6, math.log(1e-6) - 0.5e-6),
        # far below: log(1 − e^a) = −e^a − e^2a/2 − ..., where log(1 − e^a) rounds to 0
        (-30.0, -math.exp(-30.0)),
        (-1e4, 0.0),
    ],
)
def test_log1mexp_is_accurate_at_both_ends(a, expected):
    x = torch.tensor([a], dtype=torch.float32, requires_grad=True)
    y = log1mexp(x)
    assert y.item() == pytest.approx(expected, rel=1e-5, abs=1e-30)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def random_batch(seed: int, dtype: torch.dtype, n: int = 64) -> dict[str, torch.Tensor]:
    """Realistic magnitudes (summed log-probs in the hundreds), exactly representable in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    pc = -torch.rand(n, generator=g) * 400 - 1
    pr = -torch.rand(n, generator=g) * 400 - 1
    batch = {
        "policy_chosen_logps": pc,
        "policy_rejected_logps": pr,
        "ref_chosen_logps": pc + torch.randn(n, generator=g) * 20,
        "ref_rejected_logps": pr + torch.randn(n, generator=g) * 20,
    }
    batch = {k: v.to(dtype) for k, v in batch.items()}
    batch["ref_chosen_logps"] = batch["ref_chosen_logps"].clamp(max=0)
    batch["ref_rejected_logps"] = batch["ref_rejected_logps"].clamp(max=0)
    batch["chosen_lengths"] = torch.randint(1, 300, (n,), generator=g)
    batch["rejected_lengths"] = torch.randint(1, 300, (n,), generator=g)
    return batch


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("name", "params"), ALL_PAIRWISE, ids=lambda v: str(v)[:60])
def test_half_inputs_give_the_fp32_answer(name, params, half):
    low = random_batch(0, half)
    full = {k: v.float() if v.is_floating_point() else v for k, v in low.items()}  # same values
    out_low = pairwise_loss(name, **low, **params)
    out_full = pairwise_loss(name, **full, **params)
    assert out_low.loss.dtype == torch.float32
    torch.testing.assert_close(out_low.per_example, out_full.per_example, atol=1e-3, rtol=0)
    for key, value in out_full.metrics.items():
        assert out_low.metrics[key] == pytest.approx(value, abs=1e-3)


def test_these_inputs_would_catch_half_precision_arithmetic():
    # The test above can fail: DPO computed in bf16 on the same batch misses by > 1e-3.
    low = random_batch(0, torch.bfloat16)
    delta = (low["policy_chosen_logps"] - low["ref_chosen_logps"]) - (
        low["policy_rejected_logps"] - low["ref_rejected_logps"]
    )
    in_bf16 = -F.logsigmoid(0.1 * delta)
    right = pairwise_loss("dpo", **low).per_example
    assert (in_bf16.float() - right).abs().max() > 1e-3


def test_half_inputs_get_gradients_in_their_own_dtype():
    low = {k: v.requires_grad_() if v.is_floating_point() else v for k, v in random_batch(1, torch.bfloat16).items()}
    pairwise_loss("dpo", **low).loss.backward()
    assert low["policy_chosen_logps"].grad.dtype == torch.bfloat16


def test_kto_half_inputs_give_the_fp32_answer():
    b = random_batch(2, torch.bfloat16)
    kw = {
        "policy_logps": b["policy_chosen_logps"],
        "ref_logps": b["ref_chosen_logps"],
        "desirable": torch.arange(64) % 3 == 0,
        "kl_policy_logps": b["policy_rejected_logps"],
        "kl_ref_logps": b["ref_rejected_logps"],
    }
    low = unpaired_loss("kto", **kw)
    full = unpaired_loss("kto", **{k: v.float() if v.is_floating_point() else v for k, v in kw.items()})
    torch.testing.assert_close(low.per_example, full.per_example, atol=1e-3, rtol=0)
    assert low.metrics == pytest.approx(full.metrics, abs=1e-3)

"""The contract the trainer relies on: names, defaults, needs, and clear errors."""

from __future__ import annotations

import pytest
import torch

from prefopt import config
from prefopt.losses import (
    PAIRWISE_LOSSES,
    UNPAIRED_LOSSES,
    default_params,
    kto_weight_warning,
    needs_lengths,
    needs_reference,
    pairwise_loss,
    resolve_params,
    unpaired_loss,
)

POLICY = {
    "policy_chosen_logps": torch.tensor([-10.0, -8.0]),
    "policy_rejected_logps": torch.tensor([-12.0, -6.0]),
}
REF = {"ref_chosen_logps": torch.tensor([-11.0, -9.0]), "ref_rejected_logps": torch.tensor([-11.0, -8.0])}
LENGTHS = {"chosen_lengths": torch.tensor([4, 2]), "rejected_lengths": torch.tensor([5, 3])}
KTO = {
    "policy_logps": torch.tensor([-5.0, -7.0]),
    "ref_logps": torch.tensor([-6.0, -6.0]),
    "desirable": torch.tensor([True, False]),
    "kl_policy_logps": torch.tensor([-5.0, -6.0]),
    "kl_ref_logps": torch.tensor([-6.0, -6.0]),
}

REFERENCE_BASED = ["dpo", "robust", "hinge", "ipo", "nca_pair", "bco_pair", "sppo_hard",
                   "apo_zero", "apo_down", "discopop"]
REFERENCE_FREE = ["simpo", "cpo", "orpo"]


def test_loss_table_and_the_config_fields_it_needs():
    assert PAIRWISE_LOSSES[-1] == "sft" and "gpo" in PAIRWISE_LOSSES
    assert UNPAIRED_LOSSES == ("kto",)
    # The config carries every parameter of every loss (the library checks their values).
    names = set().union(*(default_params(n) for n in PAIRWISE_LOSSES + UNPAIRED_LOSSES))
    assert names <= set(config.AlgorithmConfig.model_fields)


def test_sft_reads_the_chosen_side_only():
    from prefopt.losses import needs_rejected

    chosen = torch.tensor([-6.0, -2.0], requires_grad=True)
    out = pairwise_loss("sft", policy_chosen_logps=chosen, chosen_lengths=torch.tensor([3, 2]))
    assert out.per_example.tolist() == pytest.approx([2.0, 1.0])  # -(-6)/3, -(-2)/2
    assert out.loss.item() == pytest.approx(1.5)
    assert not needs_rejected("sft") and needs_rejected("dpo") and not needs_reference("sft")


def test_defaults_are_those_of_references_md():
    table = {
        "dpo": {"beta": 0.1, "label_smoothing": 0.0, "sft_weight": 0.0},
        "robust": {"beta": 0.1, "label_smoothing": 0.1, "sft_weight": 0.0},
        "hinge": {"beta": 0.1, "sft_weight": 0.0},
        "ipo": {"beta": 0.1, "sft_weight": 0.0},
        "nca_pair": {"beta": 0.1, "sft_weight": 0.0},
        "bco_pair": {"beta": 0.1, "sft_weight": 0.0},
        "sppo_hard": {"beta": 0.1, "sft_weight": 0.0},
        "apo_zero": {"beta": 0.1, "sft_weight": 0.0},
        "apo_down": {"beta": 0.1, "sft_weight": 0.0},
        "discopop": {"beta": 0.1, "tau": 0.05, "sft_weight": 0.0},
        "simpo": {"beta": 2.0, "gamma": 1.0, "sft_weight": 0.0},
        "cpo": {"beta": 0.1, "sft_weight": 1.0},
        "orpo": {"beta": 0.1, "sft_weight": 0.0},
        "gpo": {"beta": 0.1, "function": "logistic", "score": "sum_logratio", "gamma": 0.0,
                "sft_weight": 0.0},
        "kto": {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
    }
    assert {n: default_params(n) for n in table} == table
    default_params("dpo")["beta"] = 99.0  # a copy: callers cannot change the defaults
    assert default_params("dpo")["beta"] == 0.1


def test_needs_reference():
    assert all(needs_reference(n) for n in REFERENCE_BASED + ["kto", "gpo"])
    assert not any(needs_reference(n) for n in REFERENCE_FREE)
    assert needs_reference("gpo", score="avg_logratio")
    assert not needs_reference("gpo", score="sum_logp")
    assert not needs_reference("gpo", score="avg_logp")


def test_needs_lengths():
    assert needs_lengths("ipo") and needs_lengths("simpo") and needs_lengths("orpo")
    assert needs_lengths("cpo") and needs_lengths("cpo", sft_weight=0)  # rewards are β·π/L
    assert not needs_lengths("dpo") and not needs_lengths("hinge") and not needs_lengths("kto")
    assert needs_lengths("dpo", sft_weight=0.1)  # the NLL term is per token
    assert not needs_lengths("gpo")
    assert needs_lengths("gpo", score="avg_logratio") and needs_lengths("gpo", score="sum_logp")


@pytest.mark.parametrize("name", REFERENCE_BASED)
def test_missing_reference_is_a_clear_error(name):
    with pytest.raises(ValueError, match=rf"loss '{name}' needs reference log-probs: pass ref_chosen_logps, ref_rejected_logps"):
        pairwise_loss(name, **POLICY, **LENGTHS)
    with pytest.raises(ValueError, match=r"pass ref_rejected_logps$"):
        pairwise_loss(name, **POLICY, **LENGTHS, ref_chosen_logps=REF["ref_chosen_logps"])


@pytest.mark.parametrize("name", REFERENCE_FREE)
def test_reference_free_losses_run_without_and_ignore_a_reference(name):
    alone = pairwise_loss(name, **POLICY, **LENGTHS)
    with_ref = pairwise_loss(name, **POLICY, **REF, **LENGTHS)
    torch.testing.assert_close(alone.per_example, with_ref.per_example)


@pytest.mark.parametrize(("name", "params"), [("ipo", {}), ("simpo", {}), ("cpo", {}), ("orpo", {}),
                                               ("dpo", {"sft_weight": 1.0}), ("gpo", {"score": "avg_logp"})])
def test_missing_lengths_is_a_clear_error(name, params):
    with pytest.raises(ValueError, match=rf"loss '{name}' needs completion lengths.*chosen_lengths, rejected_lengths"):
        pairwise_loss(name, **POLICY, **REF, **params)


def test_unknown_parameter_names_the_loss_and_what_it_takes():
    with pytest.raises(ValueError, match=r"loss 'dpo' does not take parameter 'bta' \(did you mean 'beta'\?\); "
                                         r"its parameters are: beta, label_smoothing, sft_weight"):
        pairwise_loss("dpo", **POLICY, **REF, bta=0.2)


def test_parameter_of_another_loss_is_an_error():
    with pytest.raises(ValueError, match=r"loss 'dpo' does not take parameter 'gamma' \(a parameter of simpo, gpo\)"):
        pairwise_loss("dpo", **POLICY, **REF, gamma=1.0)
    with pytest.raises(ValueError, match=r"loss 'kto' does not take parameter 'sft_weight'"):
        unpaired_loss("kto", **KTO, sft_weight=1.0)
    with pytest.raises(ValueError, match=r"loss 'simpo' does not take parameter 'tau'"):
        needs_reference("simpo", tau=0.1)


def test_none_means_the_default():
    assert resolve_params("simpo", beta=None, gamma=None) == default_params("simpo")
    a = pairwise_loss("dpo", **POLICY, **REF, beta=None, label_smoothing=None)
    b = pairwise_loss("dpo", **POLICY, **REF)
    torch.testing.assert_close(a.loss, b.loss)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("dpo", {"beta": 0}, r"beta must be > 0 \(got 0\)"),
        ("dpo", {"beta": -0.1}, r"beta must be > 0"),
        ("dpo", {"beta": float("nan")}, r"beta must be > 0"),
        ("dpo", {"beta": "0.1"}, r"beta must be > 0 \(got '0.1'\)"),
        ("dpo", {"beta": True}, r"beta must be > 0"),
        ("robust", {"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
        ("dpo", {"label_smoothing": -0.1}, r"label_smoothing must be in \[0, 0.5\)"),
        ("discopop", {"tau": 0}, r"tau must be > 0"),
        ("cpo", {"sft_weight": -1}, r"sft_weight must be >= 0"),
        ("gpo", {"function": "cubic"}, r"function='cubic' is not one of logistic, hinge, squared"),
        ("gpo", {"score": "logratio"}, r"score='logratio' is not one of sum_logratio, avg_logratio"),
        ("kto", {"desirable_weight": 0}, r"desirable_weight must be > 0"),
    ],
)
def test_bad_parameter_values(name, params, message):
    with pytest.raises(ValueError, match=rf"loss '{name}': {message}"):
        resolve_params(name, **params)


def test_unknown_loss_and_wrong_entry_point():
    with pytest.raises(ValueError, match=r"unknown loss 'dpp'; did you mean 'dpo'\?"):
        pairwise_loss("dpp", **POLICY)
    with pytest.raises(ValueError, match=r"loss 'kto' is unpaired: call unpaired_loss"):
        pairwise_loss("kto", **POLICY)
    with pytest.raises(ValueError, match=r"loss 'dpo' is pairwise: call pairwise_loss"):
        unpaired_loss("dpo", **KTO)


def test_bad_tensors():
    with pytest.raises(ValueError, match=r"policy_rejected_logps has shape \[3\], expected \[2\]"):
        pairwise_loss("dpo", **{**POLICY, "policy_rejected_logps": torch.zeros(3)}, **REF)
    with pytest.raises(ValueError, match=r"policy_chosen_logps must have shape \[B\]"):
        pairwise_loss("dpo", **{**POLICY, "policy_chosen_logps": torch.zeros(2, 1)}, **REF)
    with pytest.raises(TypeError, match=r"ref_chosen_logps must be a floating-point tensor"):
        pairwise_loss("dpo", **POLICY, **{**REF, "ref_chosen_logps": torch.tensor([-11, -9])})
    with pytest.raises(TypeError, match=r"policy_chosen_logps must be a torch.Tensor"):
        pairwise_loss("dpo", **{**POLICY, "policy_chosen_logps": [-10.0, -8.0]}, **REF)
    with pytest.raises(ValueError, match=r"ref_rejected_logps has non-finite values \(NaN or inf\) at rows \[1\]"):
        pairwise_loss("dpo", **POLICY, **{**REF, "ref_rejected_logps": torch.tensor([-1.0, float("nan")])})
    with pytest.raises(ValueError, match=r"chosen_lengths must be >= 1.*bad rows \[0\]"):
        pairwise_loss("ipo", **POLICY, **REF, **{**LENGTHS, "chosen_lengths": torch.tensor([0, 2])})
    with pytest.raises(TypeError, match=r"desirable must be a bool tensor of shape \[2\]"):
        unpaired_loss("kto", **{**KTO, "desirable": torch.tensor([1, 0])})
    with pytest.raises(ValueError, match=r"loss 'kto' needs log-probs of mismatched pairs.*kl_ref_logps"):
        unpaired_loss("kto", **{**KTO, "kl_ref_logps": None})


def test_output_shapes_and_types():
    out = pairwise_loss("dpo", **POLICY, **REF)
    assert out.loss.shape == () and out.per_example.shape == (2,)
    assert out.loss.item() == pytest.approx(out.per_example.mean().item())
    assert all(type(v) is float for v in out.metrics.values())
    assert set(out.metrics) == {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                                "rewards/accuracies", "logps/chosen", "logps/rejected"}
    loss, per_example, metrics = out  # a NamedTuple unpacks
    assert set(unpaired_loss("kto", **KTO).metrics) == {
        "loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"}


# ------------------------------------------------------------------ KTO weight warning


@pytest.mark.parametrize(
    ("n_d", "n_u", "w_d", "w_u"),
    [(100, 100, 1.0, 1.0), (150, 100, 1.0, 1.0), (120, 100, 1.0, 1.0), (100, 200, 2.0, 1.0), (100, 100, 1.0, 0.8)],
)
def test_kto_weights_in_range_give_no_warning(n_d, n_u, w_d, w_u):
    # (w_d·n_d)/(w_u·n_u) = 1, 1.5, 1.2, 1, 1.25: all in [1, 3/2].
    assert kto_weight_warning(n_d, n_u, w_d, w_u) is None


def test_kto_weights_out_of_range_warn_with_a_fix():
    # 100 desirable, 200 undesirable: 100/200 = 0.5 < 1. Either w_d in [2, 3] or w_u in [1/3, 1/2].
    msg = kto_weight_warning(100, 200)
    assert msg is not None and "= 0.5" in msg and "[1, 1.5]" in msg
    assert "desirable_weight in [2, 3]" in msg and "undesirable_weight in [0.333, 0.5]" in msg
    assert kto_weight_warning(160, 100) is not None  # 1.6 > 1.5
    assert kto_weight_warning(100, 101) is not None  # 0.99 < 1


def test_kto_weights_with_one_label_missing():
    assert "no undesirable examples" in kto_weight_warning(10, 0)
    assert "no desirable examples" in kto_weight_warning(0, 10)
    with pytest.raises(ValueError, match="not both 0"):
        kto_weight_warning(0, 0)
    with pytest.raises(ValueError, match="weights must be > 0"):
        kto_weight_warning(10, 10, 0.0, 1.0)

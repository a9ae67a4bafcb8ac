"""The reward-model loss against numbers worked out by hand."""

import math

import pytest
import torch

from prefopt.losses import default_params, needs_reference, reward_loss


def test_bradley_terry_by_hand():
    chosen, rejected = torch.tensor([1.0, -1.0, 2.0]), torch.tensor([0.0, 0.0, 2.0])
    out = reward_loss("reward_model", chosen_rewards=chosen, rejected_rewards=rejected)
    # -log sigmoid(d) = log(1 + e^-d): d = 1, -1, 0
    expected = [math.log(1 + math.exp(-1)), math.log(1 + math.exp(1)), math.log(2)]
    assert out.per_example.tolist() == pytest.approx(expected)
    assert out.metrics["rm/accuracy"] == pytest.approx((1 + 0.5) / 3)  # a tie is half a win
    assert out.metrics["rm/margin"] == pytest.approx(0.0)
    assert out.metrics["rewards/chosen"] == pytest.approx(2 / 3)


def test_margin_and_centring():
    chosen, rejected = torch.tensor([1.5]), torch.tensor([0.5])
    with_margin = reward_loss("reward_model", chosen_rewards=chosen, rejected_rewards=rejected, margin=1.0)
    assert with_margin.loss.item() == pytest.approx(math.log(2))  # d - margin = 0
    centred = reward_loss("reward_model", chosen_rewards=chosen, rejected_rewards=rejected, center_weight=0.1)
    assert centred.loss.item() == pytest.approx(math.log(1 + math.exp(-1)) + 0.1 * 2.0**2)
    assert default_params("reward_model") == {"margin": 0.0, "center_weight": 0.0}
    assert not needs_reference("reward_model")
    with pytest.raises(ValueError, match="margin must be >= 0"):
        reward_loss("reward_model", chosen_rewards=chosen, rejected_rewards=rejected, margin=-1.0)
    with pytest.raises(ValueError, match="not a reward-model loss"):
        reward_loss("dpo", chosen_rewards=chosen, rejected_rewards=rejected)


def test_a_head_that_scores_every_completion_alike_is_at_chance():
    constant = torch.zeros(8)
    out = reward_loss("reward_model", chosen_rewards=constant, rejected_rewards=constant.clone())
    assert out.metrics["rm/accuracy"] == pytest.approx(0.5)

"""The reward-model loss: Bradley–Terry on scalar rewards of chosen and rejected completions.

r_c, r_r = the reward model's scalar outputs for (prompt, chosen) and (prompt, rejected).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def bradley_terry(chosen_rewards: Tensor, rejected_rewards: Tensor, *, margin: float,
                  center_weight: float) -> Tensor:
    """Per-pair loss [B]: −log σ(r_c − r_r − margin) + center_weight·(r_c + r_r)².

    The Bradley–Terry likelihood of the preference (InstructGPT, arXiv 2203.02155, eq. 1); the
    margin asks for a gap of at least that size (Llama 2, arXiv 2307.09288, eq. 2, with one
    margin for every pair); the centring term keeps the rewards near zero, which the
    likelihood alone leaves free (it only sees differences).
    """
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards - margin)
    if center_weight > 0:
        loss = loss + center_weight * (chosen_rewards + rejected_rewards) ** 2
    return loss

"""RewardModelWorker: a reward model trained on preference pairs, on the engine worker.

The model is the base causal LM with a one-output head (`head="scalar"`: its
...ForSequenceClassification class, so the export loads with plain transformers). Its reward
for (prompt, completion) is the head's output at the completion's last token (the EOS).
Each step: rewards of chosen and rejected in one padded forward, the Bradley–Terry loss of
prefopt.losses.reward_loss, DeepSpeed's backward and step. Same data plan, checkpoints and
ZeRO-3 as the policy.
"""

from __future__ import annotations

import torch

from prefopt.workers.trainer import Trainer


class RewardModelWorker(Trainer):
    def __init__(self, config_json: str):
        super().__init__(config_json, role="policy")  # the trained model's ranks: the policy section

    def setup(self, model_dir: str, data_path: str, heldout_path: str | None = None) -> dict:
        from prefopt.data import TokenizedData

        info = self.build(model_dir, train=True, head="scalar")
        self.open_data(data_path)
        self.heldout = TokenizedData.open(heldout_path) if heldout_path else None
        return info

    def pair_rewards(self, data, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Rewards [B] of the rows' chosen and rejected completions (one forward over 2B
        sequences), and the number of real tokens in it."""
        from prefopt.data import collate
        from prefopt.models import accelerator_device

        batch = collate(data.rows(indices), pad_token_id=data.pad_token_id, packing=False,
                        max_length=data.max_length)
        batch = {k: v.to(accelerator_device()) for k, v in batch.items()}
        rewards = self.last_token_scalar(batch)  # [2B]
        b = len(indices)
        return rewards[:b], rewards[b:], int(batch["attention_mask"].sum())

    def micro_batch(self, step: int, micro: int, indices: list[int]):
        from prefopt.losses import reward_loss

        chosen, rejected, tokens = self.pair_rewards(self.data, indices)
        out = reward_loss(self.cfg.algorithm.name, chosen_rewards=chosen, rejected_rewards=rejected,
                          **self.cfg.algorithm.loss_params())
        return out.loss, out.metrics, tokens

    @torch.no_grad()
    def heldout_rewards(self, indices: list[int]) -> list[tuple[float, float]]:
        """(chosen reward, rejected reward) of held-out rows; all ranks together (WorkerGroup.split)."""
        was_training = self.model.training
        self.model.eval()
        try:
            out = []
            step = self.role.score_batch
            for s in range(0, len(indices), step):
                chosen, rejected, _ = self.pair_rewards(self.heldout, indices[s : s + step])
                out += list(zip(chosen.tolist(), rejected.tolist(), strict=True))
            return out
        finally:
            self.model.train(was_training)

"""RewardModelWorker: a reward model trained on preference pairs, on the engine worker.

The model is the base causal LM with a one-output head (`head="scalar"`: its
...ForSequenceClassification class, so the export loads with plain transformers). Its reward
for (prompt, completion) is the head's output at the completion's last token (the EOS).
Each step: rewards of chosen and rejected in one padded forward, the Bradley–Terry loss of
prefopt.losses.reward_loss, DeepSpeed's backward and step. Same data plan, checkpoints and
ZeRO-3 as the policy.
"""

from __future__ import annotations

import time

import torch

from prefopt.cluster.engine_worker import EngineWorker
from prefopt.cluster.sharding import StepPlan


class RewardModelWorker(EngineWorker):
    def __init__(self, config_json: str):
        super().__init__(config_json, role="policy")  # the trained model's ranks: the policy section

    def setup(self, model_dir: str, data_path: str, heldout_path: str | None = None) -> dict:
        from prefopt.data import TokenizedData

        info = self.build(model_dir, train=True, head="scalar")
        self.data = TokenizedData.open(data_path)
        self.heldout = TokenizedData.open(heldout_path) if heldout_path else None
        self.plan = StepPlan(num_rows=self.data.num_rows, micro_batch_size=self.role.micro_batch_size,
                             grad_accum=self.cfg.train.gradient_accumulation_steps, world_size=self.world_size,
                             seed=self.cfg.data.seed)
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

    def train_steps(self, start: int, count: int) -> list[dict[str, float]]:
        return [self.train_step(step) for step in range(start, start + count)]

    def train_step(self, step: int) -> dict[str, float]:
        from prefopt.losses import reward_loss
        from prefopt.workers.offline_step import mean_metrics

        self.engine.train()
        start = time.perf_counter()
        parts, tokens = [], 0
        for micro in range(self.plan.grad_accum):
            indices = self.plan.rows(step, micro, self.rank)
            chosen, rejected, n_tokens = self.pair_rewards(self.data, indices)
            out = reward_loss(self.cfg.algorithm.name, chosen_rewards=chosen, rejected_rewards=rejected,
                              **self.cfg.algorithm.loss_params())
            self.engine.backward(out.loss)
            self.engine.step()
            parts.append(out.metrics)
            tokens += n_tokens
        metrics = mean_metrics(parts)
        metrics |= {"tokens": float(tokens), "step_seconds": time.perf_counter() - start,
                    "lr": self.scheduler.get_last_lr()[0]}
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        return metrics

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

"""PPO's two trained roles on the engine worker: the policy (clipped ratio loss) and the critic
(clipped value loss), each with its own DeepSpeed engine, optimizer and ranks.

The controller (prefopt.algorithms.ppo) sends one rollout batch per iteration, `experience`:

    prompt_ids, completion_ids     [N] lists of token ids
    old_logps, advantages          [N] lists, one number per completion token (the policy's)
    old_values, returns            [N] lists, one number per completion token (the critic's)

and the minibatches of every epoch as lists of sample indices, the same on every rank. Each
rank takes its equal share of a minibatch, runs it in micro-batches and steps the optimizer
once per minibatch. The loss is a token mean over the WHOLE minibatch: each micro-batch sums
its tokens' losses and divides by the minibatch's token count, so two ranks with micro-batch
2 and one rank with micro-batch 4 take the same optimizer step.
"""

from __future__ import annotations

import time

import torch

from prefopt.workers.trainer import Trainer, mean_metrics


def micro_batches(experience: dict, minibatch: list[int], rank: int, world_size: int, micro: int, pad_id: int):
    """This rank's share of a minibatch in micro-batches: (padded batch, {per-token key: [K]})."""
    from prefopt.data.collate import pad
    from prefopt.models import accelerator_device

    share = len(minibatch) // world_size
    mine = minibatch[rank * share : (rank + 1) * share]
    per_token = [k for k in ("old_logps", "advantages", "old_values", "returns") if k in experience]
    for s in range(0, len(mine), micro):
        rows = mine[s : s + micro]
        batch = pad([experience["prompt_ids"][i] for i in rows], [experience["completion_ids"][i] for i in rows],
                    pad_token_id=pad_id)
        batch = {k: v.to(accelerator_device()) for k, v in batch.items()}
        # Flattened row by row, each completion's tokens in order: the loss_mask order.
        flat = {k: torch.tensor([x for i in rows for x in experience[k][i]], dtype=torch.float32,
                                device=accelerator_device()) for k in per_token}
        yield batch, flat


class _Learner(Trainer):
    """The update loop both roles share; `minibatch_loss` is what differs."""

    def setup(self, model_dir: str, data_path: str | None = None, schedule: dict | None = None) -> dict:
        return self.build(model_dir, train=True, head=self.head_kind, schedule=schedule)

    def update(self, experience: dict, minibatches: list[list[int]]) -> dict[str, float]:
        """One optimizer step per minibatch (epochs x minibatches in all). -> mean metrics."""
        self.engine.train()
        start = time.perf_counter()
        from prefopt.data.tokenize import pad_token_id

        micro, world = self.role.micro_batch_size, self.world_size
        parts: list[dict[str, float]] = []
        norms: list[float] = []
        for minibatch in minibatches:
            tokens = sum(len(experience["completion_ids"][i]) for i in minibatch)
            steps = len(minibatch) // world // micro
            for batch, flat in micro_batches(experience, minibatch, self.rank, world, micro,
                                                   pad_token_id(self.tokenizer)):
                loss, metrics = self.minibatch_loss(batch, flat, tokens)
                # DeepSpeed divides by the accumulation steps and averages over ranks; the loss
                # is already this minibatch's token mean, so undo both.
                self.backward_step(loss * steps * world)
                parts.append(metrics)
            norm = self.grad_norm()
            if norm is not None:
                norms.append(norm)
        out = mean_metrics(parts)
        out["seconds"] = time.perf_counter() - start
        if norms:
            out["grad_norm"] = sum(norms) / len(norms)
        return out


class PPOPolicyWorker(_Learner):
    head_kind = "lm"

    def __init__(self, config_json: str):
        super().__init__(config_json, role="policy")

    def minibatch_loss(self, batch: dict, flat: dict, tokens: int) -> tuple[torch.Tensor, dict[str, float]]:
        from prefopt.losses.ppo import clipped_policy_loss
        from prefopt.models.logprobs import completion_logits, completion_token_logps

        logits = completion_logits(self.engine, batch)  # [K, V]: only where a completion token is predicted
        logps = completion_token_logps(logits, batch)  # [K]
        ones = torch.ones_like(logps)[None]
        loss, metrics = clipped_policy_loss(logps[None], flat["old_logps"][None], flat["advantages"][None], ones,
                                            self.cfg.ppo.clip, denominator=tokens)
        with torch.no_grad():  # mean entropy of the next-token distributions, in nats
            metrics["entropy"] = float(torch.distributions.Categorical(logits=logits.float()).entropy().mean())
        metrics["policy_loss"] = float(loss.detach()) * tokens / logps.numel()  # this micro-batch's own token mean
        return loss, metrics


class CriticWorker(_Learner):
    head_kind = "scalar"

    def __init__(self, config_json: str):
        super().__init__(config_json, role="critic")

    def minibatch_loss(self, batch: dict, flat: dict, tokens: int) -> tuple[torch.Tensor, dict[str, float]]:
        from prefopt.losses.ppo import clipped_value_loss

        values = self.completion_values(batch)  # [K]
        ones = torch.ones_like(values)[None]
        loss, metrics = clipped_value_loss(values[None], flat["old_values"][None], flat["returns"][None], ones,
                                           self.cfg.ppo.value_clip, denominator=tokens)
        metrics["value_loss"] = float(loss.detach()) * tokens / values.numel()
        return loss, metrics

"""Trainer: the optimizer-step loop every trained role shares, on the engine worker.

    class PolicyWorker(Trainer):
        def micro_batch(self, step, micro, indices) -> (loss, metrics, tokens)

`train_steps(first, count)` runs optimizer steps over this rank's rows of the tokenized data
(cluster.sharding.StepPlan): gradient_accumulation_steps micro-batches each, DeepSpeed doing the
backward, the averaging over ranks, the clipping (policy.deepspeed.gradient_clipping) and the
step. A learner that steps on other batches (PPO's minibatches of a rollout) uses `backward_step`
and `step_metrics` the same way. One metrics dict per step: the micro-batches' means, `tokens`,
`step_seconds`, `lr` and `grad_norm` (when DeepSpeed computed it).
"""

from __future__ import annotations

import time

import numpy as np

from prefopt.cluster.engine_worker import EngineWorker


def mean_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    """Average metrics over micro-batches or ranks. A metric some parts lack (KTO's
    rewards/chosen in a batch without desirable examples) is averaged over the parts that have it."""
    keys = dict.fromkeys(k for part in parts for k in part)
    return {k: float(np.mean([part[k] for part in parts if k in part])) for k in keys}


class Trainer(EngineWorker):
    data = None  # prefopt.data.TokenizedData, when the role trains on rows of the data
    plan = None  # prefopt.cluster.sharding.StepPlan over those rows

    def open_data(self, data_path: str):
        """This rank's view of the tokenized data and the step plan over it."""
        from prefopt.cluster.sharding import StepPlan
        from prefopt.data import TokenizedData

        self.data = TokenizedData.open(data_path)
        self.plan = StepPlan(num_rows=self.data.num_rows, micro_batch_size=self.role.micro_batch_size,
                             grad_accum=self.cfg.train.gradient_accumulation_steps, world_size=self.world_size,
                             seed=self.cfg.data.seed)
        return self.data

    def micro_batch(self, step: int, micro: int, indices: list[int]):
        """-> (loss, metrics, tokens) of one micro-batch of this rank's rows; the loss a mean over it."""
        raise NotImplementedError

    def before_step(self, step: int, micro_rows: list[list[int]]) -> None:
        """Called with every micro-batch's rows before the first forward (e.g. to ask a live reference)."""

    def train_steps(self, start: int, count: int) -> list[dict[str, float]]:
        """Optimizer steps start..start+count-1, one metrics dict per step. Several steps per
        call: one Ray round trip per logging interval instead of one per step."""
        return [self.train_step(step) for step in range(start, start + count)]

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step: gradient_accumulation_steps micro-batches on this rank's rows."""
        self.engine.train()
        start = time.perf_counter()
        micro_rows = [self.plan.rows(step, micro, self.rank) for micro in range(self.plan.grad_accum)]
        self.before_step(step, micro_rows)
        parts, tokens = [], 0
        for micro, indices in enumerate(micro_rows):
            loss, metrics, n_tokens = self.micro_batch(step, micro, indices)
            # DeepSpeed divides by gradient_accumulation_steps and averages over ranks, so a
            # per-micro-batch mean here gives the mean over the whole global batch.
            self.backward_step(loss)
            parts.append(metrics)
            tokens += n_tokens
        return self.step_metrics(parts, start) | {"tokens": float(tokens)}

    def backward_step(self, loss) -> None:
        """Backward, then DeepSpeed's step: an optimizer step at each accumulation boundary."""
        self.engine.backward(loss)
        self.engine.step()

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()  # None when DeepSpeed did not compute it
        return None if norm is None else float(norm)

    def step_metrics(self, parts: list[dict[str, float]], start: float) -> dict[str, float]:
        out = mean_metrics(parts)
        out["step_seconds"] = time.perf_counter() - start
        out["lr"] = self.scheduler.get_last_lr()[0]
        norm = self.grad_norm()
        if norm is not None:
            out["grad_norm"] = norm
        return out

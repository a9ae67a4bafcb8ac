"""PolicyWorker: the trained model's role on the engine worker.

The controller tells every rank "run steps s..s+n"; each rank reads its own rows of the
tokenized data for each step (cluster.sharding), computes per-sequence log-probs, calls
prefopt.losses, and lets DeepSpeed do backward, gradient averaging and the optimizer step.
Generation, scoring, checkpoints and export come from EngineWorker.
"""

from __future__ import annotations

import time

import numpy as np

from prefopt.cluster.engine_worker import EngineWorker
from prefopt.cluster.sharding import StepPlan
from prefopt.workers.offline_step import mean_metrics, micro_batch_loss


class PolicyWorker(EngineWorker):
    def __init__(self, config_json: str):
        super().__init__(config_json, role="policy")

    def setup(self, model_dir: str, data_path: str | None = None, ref_cache=None,
              ref_actors: list | None = None) -> dict:
        """Build the training engine and open the data. The reference comes as a filled RefCache
        (read once, whole: a few bytes per row) or as ReferenceWorker handles asked per micro-batch."""
        from prefopt.data import TokenizedData
        from prefopt.models.logprobs import resolve_packing

        info = self.build(model_dir, train=True)
        # Every rank probes together: under ZeRO-3 a forward is a collective.
        self.packing = resolve_packing(self.engine.module, self.cfg.data.packing)
        self.data = TokenizedData.open(data_path) if data_path else None
        self.ref_logps = ref_cache.read() if ref_cache is not None else None
        # Spread live requests over the reference ranks; each policy rank always asks the same one.
        self.ref_actor = ref_actors[self.rank % len(ref_actors)] if ref_actors else None
        if self.data is not None:
            self.plan = StepPlan(
                num_rows=self.data.num_rows, micro_batch_size=self.role.micro_batch_size,
                grad_accum=self.cfg.train.gradient_accumulation_steps, world_size=self.world_size,
                seed=self.cfg.data.seed,
            )
        return info | {"packing": self.packing}

    def train_steps(self, start: int, count: int) -> list[dict[str, float]]:
        """Optimizer steps start..start+count-1, one metrics dict per step. Several steps per
        call: one Ray round trip per logging interval instead of one per step."""
        return [self.train_step(step) for step in range(start, start + count)]

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step: gradient_accumulation_steps micro-batches on this rank's rows."""
        self.engine.train()
        start = time.perf_counter()
        parts: list[dict[str, float]] = []
        tokens = 0
        micro_rows = [self.plan.rows(step, micro, self.rank) for micro in range(self.plan.grad_accum)]
        # Live reference: ask for every micro-batch now, so the reference computes while we do.
        live = [self.ref_actor.logps.remote(rows) for rows in micro_rows] if self.ref_actor else None
        for micro, indices in enumerate(micro_rows):
            loss, metrics, n_tokens = micro_batch_loss(self.engine, self.data, indices, self.cfg,
                                                       self._reference(indices, live, micro), self.packing)
            # DeepSpeed divides by gradient_accumulation_steps and averages over ranks, so a
            # per-micro-batch mean here gives the mean over the whole global batch.
            self.engine.backward(loss)
            self.engine.step()
            tokens += n_tokens
            parts.append(metrics)
        out = mean_metrics(parts)
        out["tokens"] = float(tokens)
        out["step_seconds"] = time.perf_counter() - start
        out["lr"] = self.scheduler.get_last_lr()[0]
        grad_norm = self.engine.get_global_grad_norm()  # None when DeepSpeed did not compute it
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        return out

    def _reference(self, indices: list[int], live: list | None, micro: int) -> dict[str, np.ndarray] | None:
        if live is not None:
            import ray

            return ray.get(live[micro])
        if self.ref_logps is not None:
            return {role: values[indices] for role, values in self.ref_logps.items()}
        return None

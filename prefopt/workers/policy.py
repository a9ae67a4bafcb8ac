"""PolicyWorker: the trained model's role for the offline losses (DPO family, KTO, SFT).

The controller tells every rank "run steps s..s+n"; each rank reads its own rows of the
tokenized data for each step (cluster.sharding), computes per-sequence log-probs, calls
prefopt.losses, and lets DeepSpeed do backward, gradient averaging and the optimizer step
(the loop: workers.trainer). Generation, scoring, checkpoints and export come from EngineWorker.
"""

from __future__ import annotations

import numpy as np

from prefopt.workers.offline_step import RowLogps, micro_batch_loss
from prefopt.workers.trainer import Trainer


class PolicyWorker(RowLogps, Trainer):
    def __init__(self, config_json: str):
        super().__init__(config_json, role="policy")

    def setup(self, model_dir: str, data_path: str | None = None, ref_cache=None,
              ref_actors: list | None = None, base_reference: bool = False) -> dict:
        """Build the training engine and open the data. The reference comes as a filled RefCache
        (read once, whole: a few bytes per row), as ReferenceWorker handles asked per micro-batch,
        or (base_reference, LoRA's ref.mode adapters_off) from this rank's own model with its
        adapters switched off, per micro-batch."""
        from prefopt.models.logprobs import resolve_packing

        info = self.build(model_dir, train=True)
        # Every rank probes together: under ZeRO-3 a forward is a collective.
        self.packing = resolve_packing(self.engine.module, self.cfg.data.packing)
        self.ref_logps = None
        if data_path:
            self.use_data(data_path, ref_cache)
        # Spread live requests over the reference ranks; each policy rank always asks the same one.
        self.ref_actor = ref_actors[self.rank % len(ref_actors)] if ref_actors else None
        self.live: list | None = None
        self.base_reference = base_reference
        return info | {"packing": self.packing}

    def use_data(self, data_path: str, ref_cache=None) -> int:
        """Train on other data from now on (a round's, prefopt.algorithms.rounds), with its
        reference log-probs when the loss reads them. -> its rows."""
        self.open_data(data_path)
        self.ref_logps = ref_cache.read() if ref_cache is not None else None
        return self.data.num_rows

    def scale_lr(self, factor: float) -> None:
        """Train at train.lr x factor from the next step on (ReST's decay over Improve steps): the
        schedule's base moves, its shape (warm-up, decay) stays."""
        sched = self.scheduler
        sched.base_lrs = [self.cfg.train.lr * factor for _ in sched.base_lrs]
        for group, base, shape in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
            group["lr"] = base * shape(sched.last_epoch)

    def before_step(self, step: int, micro_rows: list[list[int]]) -> None:
        # Live reference: ask for every micro-batch now, so the reference computes while we do.
        self.live = [self.ref_actor.logps.remote(rows) for rows in micro_rows] if self.ref_actor else None

    def micro_batch(self, step: int, micro: int, indices: list[int]):
        return micro_batch_loss(self.engine, self.data, indices, self.cfg, self._reference(indices, micro),
                                self.packing)

    def _reference(self, indices: list[int], micro: int) -> dict[str, np.ndarray] | None:
        if self.base_reference:  # no gradient, no dropout: the base model's log-probs of these rows
            with self._adapters(False):
                return self.logps(indices)
        if self.live is not None:
            import ray

            return ray.get(self.live[micro])
        if self.ref_logps is not None:
            return {role: values[indices] for role, values in self.ref_logps.items()}
        return None

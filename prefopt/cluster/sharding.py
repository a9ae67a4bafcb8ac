"""Which rows each rank reads at each step: a pure function of (seed, step), so resuming at a
step reproduces the data order exactly and the controller never ships rows to workers."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np


@functools.lru_cache(maxsize=2)
def _epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    # Kept, not redrawn at every micro-step: a permutation of a corpus of millions of rows takes
    # tens of milliseconds (8 bytes a row, once per rank).
    order = np.random.default_rng([seed, epoch]).permutation(num_rows)
    order.setflags(write=False)
    return order


@dataclass(frozen=True)
class StepPlan:
    num_rows: int
    micro_batch_size: int
    grad_accum: int
    world_size: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        # The last incomplete global batch of an epoch is dropped: every micro-batch has the
        # same size, which keeps the loss scaling exact across ranks and accumulation steps.
        return self.num_rows // self.global_batch

    def epoch_order(self, epoch: int) -> np.ndarray:
        return _epoch_order(self.num_rows, self.seed, epoch)

    def rows(self, step: int, micro: int, rank: int) -> list[int]:
        """Row indices for optimizer step `step` (0-based), accumulation micro-step `micro`, rank `rank`.

        Within a global batch the positions are laid out micro-step major, then rank, so
        N ranks x micro-batch b read the same rows as 1 rank x micro-batch N*b.
        """
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{self.num_rows} examples cannot fill one global batch of {self.global_batch} "
                "(micro_batch_size x gradient_accumulation_steps x num_workers)"
            )
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        start = step_in_epoch * self.global_batch + (micro * self.world_size + rank) * self.micro_batch_size
        return self.epoch_order(epoch)[start : start + self.micro_batch_size].tolist()

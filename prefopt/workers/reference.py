"""ReferenceWorker: the frozen reference model's role on the engine worker; never a policy rank.

A plain frozen copy per rank by default; with ref.deepspeed.offload_param, DeepSpeed ZeRO-3
inference with the parameters in CPU memory, streamed to the device layer by layer (a
reference far larger than the GPU fits beside the policy). It answers:

    logps(indices)     summed completion log-probs of data rows, by role (the RefCache; live mode)
    score(samples)     per-token log-probs of given completions (EngineWorker: evaluation's KL, PPO)
    generate(...)      its own samples (EngineWorker: the reference's point of the frontier)

`fill_cache` (controller side) computes every missing RefCache shard on the reference group.
"""

from __future__ import annotations

import numpy as np

from prefopt.cluster.engine_worker import EngineWorker
from prefopt.workers.offline_step import RowLogps


class ReferenceWorker(RowLogps, EngineWorker):
    def __init__(self, config_json: str):
        super().__init__(config_json, role="ref")

    def setup(self, model_dir: str, data_path: str | None = None) -> dict:
        from prefopt.models.logprobs import resolve_packing

        info = self.build(model_dir, train=False)
        self.packing = resolve_packing(self.model, self.cfg.data.packing)
        self.data = None
        if data_path:
            self.use_data(data_path)
        return info

    def use_data(self, data_path: str) -> int:
        """Answer for other rows from now on (a round's data, prefopt.algorithms.rounds). -> their number."""
        from prefopt.data import TokenizedData

        self.data = TokenizedData.open(data_path)
        return self.data.num_rows


def fill_cache(group, cache, missing: list, on_shard=None) -> int:
    """Compute the `missing` shards of `cache` (cache.missing_shards(), or what the caller
    already checked) on the reference group; returns the rows computed. Each shard is split
    across the ranks and written as soon as it is done, so a killed precompute keeps what it
    has finished."""
    for shard in missing:
        rows = group.split("logps_of_rows", list(range(shard.start, shard.stop)))
        values = {role: np.array([r[role] for r in rows], dtype=np.float32) for role in cache.roles}
        cache.write_shard(shard, values)
        if on_shard is not None:
            on_shard(shard.num_rows)
    return sum(s.num_rows for s in missing)

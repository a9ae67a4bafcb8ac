"""The reference model, served by its own Ray actors, never by a policy rank.

ReferenceWorker: one actor holding the frozen reference model (on CPU here; see `_load` for
GPUs). It answers "summed completion log-probs of these rows" (offline losses) and, for
online algorithms, per-token log-probs of a collated batch.

ReferenceServer: a pool of `ref.num_replicas` workers. `fill(cache)` precomputes every
missing shard of a RefCache in parallel (ref.mode=cache); in ref.mode=live the policy
workers hold the actor handles and ask per micro-batch.
"""

from __future__ import annotations

import numpy as np
import torch

from prefopt.config import RunConfig
from prefopt.models import quiet_transformers

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ReferenceWorker:
    def __init__(self, config_json: str, model_dir: str, data_path: str):
        from prefopt.data import TokenizedData
        from prefopt.models.logprobs import resolve_packing

        self.cfg = RunConfig.model_validate_json(config_json)
        quiet_transformers()
        torch.set_num_threads(max(1, int(self.cfg.cluster.cpus_per_worker)))
        self.model = self._load(model_dir)
        self.data = TokenizedData.open(data_path)
        self.packing = resolve_packing(self.model, self.cfg.data.packing)

    def _load(self, model_dir: str):
        from transformers import AutoModelForCausalLM

        dtype = DTYPES[self.cfg.model.dtype]
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        model.requires_grad_(False).eval()
        if torch.cuda.is_available():
            model.to("cuda")
        return model

    def ready(self) -> bool:
        return True

    @torch.no_grad()
    def logps(self, indices: list[int]) -> dict[str, np.ndarray]:
        """Summed completion log-probs (fp32) of the rows, by role: chosen/rejected or completion/kl."""
        from prefopt.algorithms.offline import sequence_logps_of_rows

        step = self.cfg.train.micro_batch_size
        parts = [sequence_logps_of_rows(self.model, self.data, indices[s : s + step], self.packing)
                 for s in range(0, len(indices), step)]
        return {role: torch.cat([p[role] for p in parts]).numpy() for role in parts[0]}

    @torch.no_grad()
    def token_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-token log-probs [R, T] (fp32, 0 off the completion) of a collated batch (PPO)."""
        from prefopt.models.logprobs import token_logps

        device = next(self.model.parameters()).device
        return token_logps(self.model, {k: v.to(device) for k, v in batch.items()}).cpu()


class ReferenceServer:
    """`ref.num_replicas` ReferenceWorker actors answering in parallel."""

    def __init__(self, cfg: RunConfig, model_dir, data):
        import ray

        resources = {"num_cpus": cfg.cluster.cpus_per_worker}
        if cfg.cluster.gpus_per_worker:
            resources["num_gpus"] = cfg.cluster.gpus_per_worker
        remote = ray.remote(**resources)(ReferenceWorker)
        self.actors = [remote.remote(cfg.model_dump_json(), str(model_dir), str(data.path))
                       for _ in range(cfg.ref.num_replicas)]
        ray.get([a.ready.remote() for a in self.actors])

    def fill(self, cache, on_shard=None) -> int:
        """Compute every missing shard of `cache`; returns the rows computed. Shards are written
        one at a time as they finish, so a killed precompute keeps what it has done."""
        from ray.util import ActorPool

        missing = cache.missing_shards()
        answers = ActorPool(self.actors).map(lambda a, s: a.logps.remote(list(range(s.start, s.stop))), missing)
        for shard, values in zip(missing, answers, strict=True):
            cache.write_shard(shard, values)
            if on_shard is not None:
                on_shard(shard.num_rows)
        return sum(s.num_rows for s in missing)

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)

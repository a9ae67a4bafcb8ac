"""The reference model, served by its own Ray actors, never by a policy rank.

ReferenceWorker: one actor holding the frozen reference model: plainly, or with ref.offload
under DeepSpeed ZeRO-3 inference with its parameters in CPU memory (`_load_offloaded`). It answers "summed completion log-probs of these rows" (offline losses) and, for
online algorithms, per-token log-probs of a collated batch.

ReferenceServer: a pool of `ref.num_replicas` workers. `fill(cache)` precomputes every
missing shard of a RefCache in parallel (ref.mode=cache); in ref.mode=live the policy
workers hold the actor handles and ask per micro-batch.
"""

from __future__ import annotations

import numpy as np
import torch

from prefopt.config import RunConfig
from prefopt.models import DTYPES, quiet_transformers


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

        from prefopt.models import accelerator_device

        dtype = DTYPES[self.cfg.model.dtype]
        if not self.cfg.ref.offload:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
            return model.requires_grad_(False).eval().to(accelerator_device())
        return self._load_offloaded(model_dir, dtype)

    def _load_offloaded(self, model_dir: str, dtype: torch.dtype):
        """ZeRO-3 inference with parameters kept in CPU memory and streamed to the device layer by
        layer: a reference far larger than GPU memory fits beside the policy. Each replica is its
        own world of one rank."""
        import os

        import deepspeed
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        from prefopt.cluster.worker_group import free_port

        gpu = torch.cuda.is_available()
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
        deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo", auto_mpi_discovery=False, verbose=False)
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": gpu}},
            "bf16": {"enabled": dtype == torch.bfloat16},
            "fp16": {"enabled": dtype == torch.float16},
        }
        self._hf_ds_config = HfDeepSpeedConfig(config)  # from_pretrained loads straight into partitions
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        engine = deepspeed.initialize(model=model, config=config)[0]
        return engine.module.requires_grad_(False).eval()

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
        from prefopt.models import accelerator_device
        from prefopt.models.logprobs import token_logps

        return token_logps(self.model, {k: v.to(accelerator_device()) for k, v in batch.items()}).cpu()


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
        try:
            ray.get([a.ready.remote() for a in self.actors], timeout=cfg.cluster.collective_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.shutdown()
            raise RuntimeError(
                f"ReferenceServer: {cfg.ref.num_replicas} replica(s) of {resources} not started within "
                f"{cfg.cluster.collective_timeout_s}s; the cluster has {ray.cluster_resources()}. Lower "
                "ref.num_replicas or cluster.cpus_per_worker, or add nodes."
            ) from None

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

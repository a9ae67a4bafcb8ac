"""PolicyWorker: one Ray actor = one DeepSpeed rank holding a (ZeRO-sharded) policy.

The controller tells every worker "run step s"; each worker reads its own rows of the
tokenized data for that step (cluster.sharding), computes per-sequence log-probs, calls
prefopt.losses, and lets DeepSpeed do backward, gradient averaging and the optimizer step.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from prefopt.cluster.deepspeed_config import deepspeed_config
from prefopt.cluster.sharding import StepPlan
from prefopt.cluster.worker_group import RankEnv
from prefopt.config import RunConfig
from prefopt.models import DTYPES, quiet_transformers


def lr_lambda(schedule: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def _param_bytes(module: torch.nn.Module) -> int:
    """Parameter bytes this rank holds: its ZeRO-3 partition, or the full tensors."""
    total = 0
    for p in module.parameters():
        local = getattr(p, "ds_tensor", p)
        total += local.numel() * local.element_size()
    return total


class PolicyWorker(RankEnv):
    def __init__(self, config_json: str):
        self.cfg = RunConfig.model_validate_json(config_json)
        quiet_transformers()
        # DeepSpeed 0.19 still calls collectives that torch 2.13 deprecates, once per step.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated")
        torch.set_num_threads(max(1, int(self.cfg.cluster.cpus_per_worker)))

    # ------------------------------------------------------------------ setup

    def setup(self, model_dir: str, data_path: str, ref_cache=None, ref_actors: list | None = None) -> dict:
        """Build the engine and open the data. The reference comes as a filled RefCache (read
        once, whole: a few bytes per row) or as ReferenceWorker handles asked per micro-batch."""
        import deepspeed
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        from prefopt.data import TokenizedData
        from prefopt.models.logprobs import resolve_packing

        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        ds_config = deepspeed_config(cfg, self.world_size)
        dtype = DTYPES[cfg.model.dtype]
        # While this object lives, from_pretrained builds the model under deepspeed.zero.Init,
        # so with ZeRO-3 no rank ever materialises the full model.
        self.zero_stage = ds_config["zero_optimization"]["stage"]
        self._hf_ds_config = HfDeepSpeedConfig(ds_config) if self.zero_stage == 3 else None
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        model.config.use_cache = False
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=cfg.train.adam_betas,
                                      weight_decay=cfg.train.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(cfg.train.lr_schedule, cfg.train.warmup_steps, cfg.train.max_steps)
        )
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        # Every rank probes together: under ZeRO-3 a forward is a collective.
        self.packing = resolve_packing(self.engine.module, cfg.data.packing)
        self.data = TokenizedData.open(data_path)
        self.ref_logps = ref_cache.read() if ref_cache is not None else None
        # Spread live requests over the replicas; each rank always asks the same one.
        self.ref_actor = ref_actors[self.rank % len(ref_actors)] if ref_actors else None
        self.plan = StepPlan(
            num_rows=self.data.num_rows, micro_batch_size=cfg.train.micro_batch_size,
            grad_accum=cfg.train.gradient_accumulation_steps, world_size=self.world_size,
            seed=cfg.data.seed,
        )
        return {"rank": self.rank, "param_bytes": _param_bytes(self.engine.module), "packing": self.packing,
                "zero_stage": self.zero_stage}

    # ------------------------------------------------------------------ training

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step: gradient_accumulation_steps micro-batches on this rank's rows."""
        from prefopt.algorithms.offline import mean_metrics, micro_batch_loss

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
        return out

    def _reference(self, indices: list[int], live: list | None, micro: int) -> dict[str, np.ndarray] | None:
        import ray

        if live is not None:
            return ray.get(live[micro])
        if self.ref_logps is not None:
            return {role: values[indices] for role, values in self.ref_logps.items()}
        return None

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, directory: str, tag: str, client_state: dict) -> None:
        self.engine.save_checkpoint(directory, tag=tag, client_state=client_state)
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        torch.save(rng, Path(directory) / tag / f"rng_rank{self.rank}.pt")

    def load_checkpoint(self, directory: str, tag: str) -> dict:
        _, client_state = self.engine.load_checkpoint(directory, tag=tag)
        rng = torch.load(Path(directory) / tag / f"rng_rank{self.rank}.pt", weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        return client_state or {}

    def export(self, out_dir: str, tokenizer_dir: str) -> None:
        """Save the policy as a plain Hugging Face directory (ZeRO-3 shards gathered on rank 0)."""
        from transformers import AutoTokenizer

        if self.zero_stage == 3:
            state_dict = self.engine._zero3_consolidated_16bit_state_dict()  # every rank must call
        else:
            state_dict = self.engine.module.state_dict()
        if self.rank == 0:
            self.engine.module.save_pretrained(out_dir, state_dict=state_dict)
            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)

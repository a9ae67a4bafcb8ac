"""RunConfig -> the DeepSpeed config dict each PolicyWorker hands to deepspeed.initialize."""

from __future__ import annotations

import copy

from prefopt.config import RunConfig


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def effective_zero_stage(cfg: RunConfig, world_size: int) -> int:
    """ZeRO partitions across ranks; on one rank without offload it partitions nothing and only
    adds per-module gather/release hooks (about 20% of a step on the tiny model), so use 0."""
    ds = cfg.deepspeed
    if world_size == 1 and not (ds.offload_param or ds.offload_optimizer):
        return 0
    return ds.zero_stage


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict:
    ds, train = cfg.deepspeed, cfg.train
    stage = effective_zero_stage(cfg, world_size)
    zero: dict = {"stage": stage}
    if stage == 3:
        # Export gathers the shards into one 16-bit (or fp32) state dict on rank 0.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.cluster.gpus_per_worker > 0}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.cluster.gpus_per_worker > 0}
    config = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train_batch_size": train.micro_batch_size * train.gradient_accumulation_steps * world_size,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "fp16": {"enabled": cfg.model.dtype == "float16"},
        # The optimizer is ours (torch AdamW): DeepSpeed's CPU Adam would need a C++ build.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(config, ds.extra)

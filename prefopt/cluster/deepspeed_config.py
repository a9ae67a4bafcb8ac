"""A role's config -> the DeepSpeed config dict its engine workers hand to deepspeed.initialize."""

from __future__ import annotations

import copy

from prefopt.config import RoleConfig, TrainConfig


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def effective_zero_stage(role: RoleConfig, world_size: int) -> int:
    """ZeRO partitions across ranks; on one rank without offload it partitions nothing and only
    adds per-module gather/release hooks (about 20% of a step on the tiny model), so use 0."""
    ds = role.deepspeed
    if world_size == 1 and not (ds.offload_param or ds.offload_optimizer):
        return 0
    return ds.zero_stage


def deepspeed_config(role: RoleConfig, *, dtype: str, world_size: int, train: TrainConfig | None) -> dict:
    """train=None: an inference engine (no optimizer, no gradient accumulation)."""
    ds = role.deepspeed
    stage = effective_zero_stage(role, world_size)
    pin = role.gpus_per_worker > 0
    zero: dict = {"stage": stage}
    if stage == 3:
        # Export gathers the shards into one 16-bit (or fp32) state dict on rank 0.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if ds.offload_optimizer and train is not None:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    accumulation = train.gradient_accumulation_steps if train is not None else 1
    config = {
        "train_micro_batch_size_per_gpu": role.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": role.micro_batch_size * accumulation * world_size,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        # The optimizer is ours (torch AdamW): DeepSpeed's CPU Adam would need a C++ build.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(config, ds.extra)

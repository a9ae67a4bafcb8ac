"""LoRA through peft: adapters on a frozen base model, switched off to give the reference.

    model = add_adapters(model, cfg.model.lora, head)   the trained roles' model (EngineWorker.build)
    with adapters_off(model): ...                       the base model: the reference, no second copy
    hf = transformers_model(model)                      the Hugging Face model underneath
    save_adapter(model, state_dict, directory)          peft's adapter directory (+ modules trained fully)
    merge_adapter(base, adapter_dir, out_dir)           a plain transformers directory, adapters merged in

Under ZeRO-3 the base model is built partitioned (from_pretrained under deepspeed.zero.Init) and
the adapters are added after, as ordinary tensors; deepspeed.initialize partitions those too. A
module trained fully (a scalar head) is trained in place, not through peft's modules_to_save:
that wrapper deep-copies the module, and a copy of a ZeRO-3 partitioned parameter is a second
parameter with the first one's partition id.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

from prefopt.config import LoraConfig

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def add_adapters(model, lora: LoraConfig, head: str):
    """`model` with LoRA adapters: only they (and lora.train_fully, and a scalar head) train."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
        target_modules=lora.target_modules,
        # CAUSAL_LM: AutoPeftModelForCausalLM loads the export. A scalar head's task type (SEQ_CLS)
        # would wrap the head in modules_to_save (see the module docstring): no task type there.
        task_type="CAUSAL_LM" if head == "lm" else None)
    # autocast_adapter_dtype=False: the adapters in the model's dtype, as DeepSpeed's bf16 mode expects.
    with quiet_peft():
        model = get_peft_model(model, config, autocast_adapter_dtype=False)
    for name in fully_trained(lora, head):
        module = transformers_model(model).get_submodule(name)
        module.requires_grad_(True)
    return model


@contextmanager
def quiet_peft():
    """peft 0.21 asks transformers 5 for a name it deprecates, once per model: not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def fully_trained(lora: LoraConfig, head: str) -> list[str]:
    """Module names trained in full beside the adapters: lora.train_fully, and a new scalar head."""
    return list(dict.fromkeys(lora.train_fully + (["score"] if head == "scalar" else [])))


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def transformers_model(model):
    """The Hugging Face model (with the adapter layers injected, for a peft model)."""
    return model.get_base_model() if is_peft(model) else model


def adapters_off(model):
    """A context in which `model` computes as its base model (no-op for a model without adapters)."""
    return model.disable_adapter() if is_peft(model) else nullcontext()


def save_adapter(model, state_dict: dict, directory: str | Path, fully: list[str]) -> None:
    """peft's adapter directory (adapter_config.json, adapter_model.safetensors) from the whole
    model's `state_dict` (ZeRO-3: gathered), loadable with PeftModel.from_pretrained on the base
    model. Modules trained fully are stored as peft stores modules_to_save, so it loads them too."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(str(directory), state_dict=state_dict)
    if not fully:
        return
    config = model.peft_config["default"]
    config.modules_to_save = fully
    config.save_pretrained(str(directory))
    weights = Path(directory) / ADAPTER_WEIGHTS
    tensors = load_file(weights)
    for key, value in state_dict.items():
        # base_model.model.<module>.<param>: the key peft gives a modules_to_save parameter on save.
        inner = key.removeprefix("base_model.model.")
        if any(inner.startswith(f"{name}.") for name in fully):
            tensors[key] = value.detach().cpu().contiguous()
    save_file(tensors, weights, metadata={"format": "pt"})


def merge_adapter(base, adapter_dir: str | Path, out_dir: str | Path) -> None:
    """`base` (a plain model, e.g. loaded inside outside_zero3()) with the adapter merged into its
    weights (peft's merge_and_unload), saved as a plain transformers directory."""
    from peft import PeftModel

    with quiet_peft():
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.config.use_cache = True
    merged.save_pretrained(str(out_dir))


@contextmanager
def outside_zero3():
    """from_pretrained builds a plain model here even while the worker's HfDeepSpeedConfig lives."""
    from transformers.integrations import deepspeed as hf_ds

    ref = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = ref

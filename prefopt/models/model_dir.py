"""What a model directory holds, read from its config.json: the one check of "is this a Hugging
Face model directory" and "has it a scalar head" (a reward model, a critic), for any store."""

from __future__ import annotations

import json

from prefopt.errors import UserError


def model_config(path: str, field: str, error: type[Exception] = UserError) -> dict:
    """config.json of the model directory at `path` (local or a store's URI), or `error` naming
    the config field that gave the path."""
    from prefopt.storage import Store

    config_file = Store.at(path) / "config.json"
    if not config_file.is_file():
        if (Store.at(path) / "adapter_config.json").is_file():
            raise error(f"{field}: {path} holds a LoRA adapter, not a model; use the run's merged export "
                        "(output_dir/model, written with model.lora.merge_on_export: true) or its base model")
        raise error(f"{field}: {path} is not a Hugging Face model directory (no config.json)")
    return json.loads(config_file.read_text())


def has_scalar_head(config: dict) -> bool:
    """A ...ForSequenceClassification: a causal LM's body with a linear head (reward model, critic)."""
    return any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def check_reward_model(path: str, field: str = "reward.model_path", error: type[Exception] = UserError) -> dict:
    """config.json of a reward model; refuses a directory without exactly one scalar output."""
    config = model_config(path, field, error)
    if not has_scalar_head(config):
        architectures = config.get("architectures") or []
        raise error(f"{field}: {path} holds no scalar head (architectures {', '.join(architectures) or 'none'}; "
                    "a reward model is a ...ForSequenceClassification, e.g. the export of algorithm reward_model)")
    labels = len(config.get("id2label") or {}) or config.get("num_labels", 1)
    if labels != 1:
        raise error(f"{field}: {path} has {labels} labels; a reward model has one")
    return config

"""Causal LMs for prefopt: tiny ones built locally, real ones loaded with from_pretrained."""

import torch

from prefopt.models.tiny import build_tiny_model, build_tokenizer, ensure_model, model_and_tokenizer, save_tiny

__all__ = ["DTYPES", "build_tiny_model", "build_tokenizer", "ensure_model", "model_and_tokenizer", "save_tiny"]

# model.dtype names -> torch dtypes
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quiet_transformers() -> None:
    """No per-file progress bars or info lines from transformers: prefopt shows its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def accelerator_device():
    """Where a worker's tensors go: the GPU Ray gave this actor (it sees it as cuda:0), else CPU.
    Under ZeRO-3 a parameter's own .device says nothing (partitions and placeholders)."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

"""Causal LMs for prefopt: tiny ones built locally, real ones loaded with from_pretrained."""

from prefopt.models.tiny import build_tiny_model, build_tokenizer, ensure_model, save_tiny

__all__ = ["build_tiny_model", "build_tokenizer", "ensure_model", "save_tiny"]

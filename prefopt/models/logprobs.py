"""Per-sequence and per-token log-probs of completions, from a batch of prefopt.data.collate.

    logps, lengths = sequence_logps(model, batch)   # [N] fp32 summed over completion tokens, [N]
    per_token = token_logps(model, batch)           # [R, T] fp32, 0 off the completion (PPO)

Memory: the model's logits [R, T, V] are the one full-vocabulary tensor. Log-probs are taken
only at completion positions, in chunks, as logit[label] - logsumexp(logits) in fp32, by an
autograd function whose backward writes the gradient straight into one [R, T, V] tensor. So
neither a log_softmax copy nor (for bf16 models) an fp32 copy of the logits is ever made.

Packing: transformers' masking utilities (masking_utils.find_packed_sequence_indices; checked
with transformers 5.23, eager and sdpa attention) treat a row as several sequences when
attention_mask is None and position_ids restart at 0: the causal mask becomes block-diagonal.
Only without a KV cache, though: LlamaModel makes one unless use_cache=False (config.use_cache
is True by default), and then packed sequences see each other. So every forward here passes
use_cache=False. `packing_supported` checks a model empirically; `resolve_packing` falls back
to padded batches, saying so once, for models that do not keep packed sequences apart.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("prefopt.models")

# Rows of [*, V] fp32 per chunk: 2**26 elements = 256 MiB, whatever the vocabulary size.
CHUNK_ELEMENTS = 1 << 26


class _SelectedLogProbs(torch.autograd.Function):
    """log softmax(logits[p])[label_p] for the selected flat positions p, chunked.

    d/dlogits of logit[y] - logsumexp(logits) is onehot(y) - softmax(logits); rows that were not
    selected get zero gradient. positions=None selects every row in order (logits already taken
    at the completion positions): chunks are then views, and nothing is copied or zero-filled.
    """

    @staticmethod
    def forward(ctx, flat_logits, positions, labels, chunk):  # [M, V], [K] or None, [K] -> [K] fp32
        # At least fp32 (bf16 logits are read chunk by chunk in fp32); fp64 stays fp64.
        dtype = torch.promote_types(flat_logits.dtype, torch.float32)
        k = labels.shape[0]
        out = torch.empty(k, dtype=dtype, device=flat_logits.device)
        lse = torch.empty_like(out)
        for s in range(0, k, chunk):
            rows = _rows(flat_logits, positions, s, chunk).to(dtype)  # [c, V]
            lse[s : s + chunk] = torch.logsumexp(rows, dim=-1)
            out[s : s + chunk] = rows.gather(1, labels[s : s + chunk, None]).squeeze(1) - lse[s : s + chunk]
        ctx.save_for_backward(flat_logits, positions, labels, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad):  # grad: [K]
        flat_logits, positions, labels, lse = ctx.saved_tensors
        every_row = positions is None
        grad_logits = torch.empty_like(flat_logits) if every_row else torch.zeros_like(flat_logits)
        g = grad.to(lse.dtype)
        for s in range(0, labels.shape[0], ctx.chunk):
            rows = _rows(flat_logits, positions, s, ctx.chunk).to(lse.dtype)
            d = torch.exp(rows - lse[s : s + ctx.chunk, None]).mul_(-g[s : s + ctx.chunk, None])
            d.scatter_add_(1, labels[s : s + ctx.chunk, None], g[s : s + ctx.chunk, None])
            if every_row:
                grad_logits[s : s + ctx.chunk] = d
            else:
                grad_logits.index_copy_(0, positions[s : s + ctx.chunk], d.to(grad_logits.dtype))
        return grad_logits, None, None, None


def _rows(flat_logits: torch.Tensor, positions: torch.Tensor | None, start: int, chunk: int) -> torch.Tensor:
    if positions is None:
        return flat_logits[start : start + chunk]  # a view
    return flat_logits.index_select(0, positions[start : start + chunk])


def selected_logps(logits: torch.Tensor, loss_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probs of labels where loss_mask is set: logits [R, T, V] -> [K] fp32, K = mask.sum()."""
    vocab = logits.shape[-1]
    positions = loss_mask.reshape(-1).nonzero().squeeze(1)  # one host sync per forward
    chunk = max(1, CHUNK_ELEMENTS // vocab)
    return _SelectedLogProbs.apply(logits.reshape(-1, vocab), positions,
                                   labels.reshape(-1)[positions], chunk)


def forward_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits [R, T, V] of a collated batch (padded or packed)."""
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),  # None when packed: see the module docstring
        position_ids=batch["position_ids"],
        use_cache=False,
    ).logits


def logps_from_logits(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs [N] fp32 and completion lengths [N] long of each sequence.

    logits: [R, T, V] for the whole batch, or [K, V] at the loss_mask positions only
    (completion_logits)."""
    mask = batch["loss_mask"]
    if logits.dim() == 2:  # already at the K completion positions, in mask order
        token = completion_token_logps(logits, batch)
    else:
        token = selected_logps(logits, mask, batch["labels"])  # [K]
    seq = batch["seq_index"][mask]  # [K], sequence of each completion token
    n = batch["lengths"].shape[0]
    logps = torch.zeros(n, dtype=token.dtype, device=logits.device).index_add(0, seq, token)
    lengths = torch.bincount(seq, minlength=n)
    return logps, lengths


def completion_token_logps(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Log-probs [K] fp32 of the K completion tokens, from completion_logits' [K, V], in mask
    order (row by row, each completion's tokens in order)."""
    chunk = max(1, CHUNK_ELEMENTS // logits.shape[-1])
    return _SelectedLogProbs.apply(logits, None, batch["labels"][batch["loss_mask"]], chunk)


def completion_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits [K, V] only where a completion token is predicted (the K loss_mask positions).

    The output layer runs on K positions instead of R*T: prompt and padding positions cost no
    vocabulary projection, forward or backward (with a 32k-256k vocabulary that is most of the
    step's memory). Models whose logits are more than output_layer(hidden) (logit soft-capping)
    take the full forward.
    """
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the Hugging Face model
    decoder = module.get_decoder() if hasattr(module, "get_decoder") else None
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    if decoder is None or head is None or getattr(module.config, "final_logit_softcapping", None):
        return forward_logits(model, batch)[batch["loss_mask"]]
    hidden = decoder(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch["position_ids"],
        use_cache=False,
    ).last_hidden_state  # [R, T, H]
    return head(hidden[batch["loss_mask"]])  # [K, V]


def token_logps_from_logits(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token completion log-probs [R, T] fp32, aligned with batch["labels"], 0 elsewhere."""
    mask = batch["loss_mask"]
    token = selected_logps(logits, mask, batch["labels"])
    return torch.zeros(mask.shape, dtype=token.dtype, device=logits.device).masked_scatter(mask, token)


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logps [N] fp32, lengths [N]) for the N sequences of `batch` (order: prefopt.data.collate)."""
    return logps_from_logits(completion_logits(model, batch), batch)


def token_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token completion log-probs [R, T] fp32 (0 off the completion), e.g. for PPO."""
    return token_logps_from_logits(forward_logits(model, batch), batch)


@torch.no_grad()
def packing_supported(model) -> bool:
    """Does `model` keep packed sequences apart? Compares a packed and a padded forward pass.

    Every ZeRO-3 rank must call it together (the forward passes gather parameters).
    """
    from prefopt.data.collate import pack, pad

    param = next(model.parameters())
    device = param.device
    # Two short sequences of ordinary ids; any model that leaks attention across the boundary
    # changes the second one's logits by far more than rounding.
    prompts, completions = [[3, 4, 5, 6], [7, 8]], [[9, 10], [11, 12, 13]]
    was_training = model.training
    model.eval()  # no dropout in the comparison
    try:
        packed = {k: v.to(device) for k, v in pack(prompts, completions).items()}
        padded = {k: v.to(device) for k, v in pad(prompts, completions, pad_token_id=0).items()}
        a = forward_logits(model, packed)[0].float()  # [S, V]
        b = forward_logits(model, padded).float()  # [2, T, V]
    finally:
        model.train(was_training)
    first = len(prompts[0]) + len(completions[0])
    second = b[1, : len(prompts[1]) + len(completions[1])]
    tol = 1e-3 if param.dtype == torch.float32 else 5e-2  # half precision rounds more
    scale = second.abs().max().clamp_min(1.0)
    return bool((a[first:] - second).abs().max() <= tol * scale)


_warned: set[str] = set()


def resolve_packing(model, requested: bool) -> bool:
    """`requested`, unless the model cannot pack; then False, with one warning per model type."""
    if not requested or packing_supported(model):
        return requested
    attention = getattr(getattr(model, "config", None), "_attn_implementation", "?")
    name = f"{type(model).__name__} ({attention} attention)"
    if name not in _warned:
        _warned.add(name)
        log.warning("data.packing: %s does not keep packed sequences apart; "
                    "using padded batches instead", name)
    return False

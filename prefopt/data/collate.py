"""Rows of TokenizedData -> one batch of tensors for one forward pass, padded or packed.

Sequence order (N sequences, B rows):
- pairs:    sequence i < B is prompt_i + chosen_i, sequence B + i is prompt_i + rejected_i, so
            logps[:B] are chosen and logps[B:] rejected. Chosen and rejected go through one
            forward pass: one all-gather of ZeRO-3 parameters instead of two.
- unpaired: sequence i < B is prompt_i + completion_i; sequence B + i is the KL pair
            prompt_i + kl_completion_ids_i (KTO's mismatched pairs; TokenizedData.rows gives
            each example the completion of the next row of the data set, (index + 1) mod N).
- prompts:  left-padded prompts for generation (packing does not apply).

Keys (R rows of T tokens: R = N, padded; packed, R rows of at most max(max_length, longest)
tokens, see `pack`):
    input_ids       [R, T] long
    position_ids    [R, T] long   0.. within each sequence (reset at each packed boundary)
    attention_mask  [R, T] long   1 = token, 0 = padding. Absent when packed: the model then
                                  reads the boundaries from position_ids (prefopt.models.logprobs)
    labels          [R, T] long   labels[r, t] = input_ids[r, t + 1] when that token is a
                                  completion token of the same sequence, else -100
    loss_mask       [R, T] bool   labels != -100: logits at t predict a completion token
    seq_index       [R, T] long   sequence (0..N-1) each token belongs to; -1 for padding
    lengths         [N] long      completion tokens per sequence (= loss_mask tokens)
    example_index   [B] long      TokenizedData positions of the rows (the RefCache key)
    desirable       [B] bool      unpaired only: the rows' labels
Prompt batches: input_ids [B, P] and attention_mask [B, P], left-padded, and example_index.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prefopt.data.formats import SEQUENCE_ROLES

IGNORE = -100


def _sequences(rows: Sequence[dict], max_length: int | None) -> tuple[list, list]:
    """(prompt ids, completion ids) of every sequence of the batch, in batch order."""
    kind = _kind(rows)
    if kind == "pair":
        prompts = [r["prompt_ids"] for r in rows] * 2
        completions = [r[f"{role}_ids"] for role in SEQUENCE_ROLES["pair"] for r in rows]
        return prompts, completions
    # KTO's KL term pairs prompt i with another example's completion. The partner is fixed per
    # example by TokenizedData.rows (the next row of the data set), not by the batch, so the
    # reference log-probs of the mismatched pairs can be computed once and cached.
    prompts = [r["prompt_ids"] for r in rows] * 2
    completions = [r["completion_ids"] for r in rows]
    mismatched = [r["kl_completion_ids"] for r in rows]
    if max_length is not None:  # a mismatched pair can be longer than any real one
        mismatched = [c[: max(1, max_length - len(p))] for p, c in zip(prompts[: len(rows)], mismatched, strict=True)]
    return prompts, completions + mismatched


def _kind(rows: Sequence[dict]) -> str:
    if not rows:
        raise ValueError("cannot collate an empty batch")
    # A row holds the ids of its kind's first sequence (TokenizedData columns); prompt rows have none.
    for kind, (first, _) in SEQUENCE_ROLES.items():
        if f"{first}_ids" in rows[0]:
            return kind
    return "prompt"


def collate(rows: Sequence[dict], *, pad_token_id: int, packing: bool, max_length: int | None = None,
            min_packing_gain: float = 0.0, rejected: bool = True) -> dict[str, torch.Tensor]:
    """One batch for TokenizedData rows of any kind (see the module docstring for the layout).

    min_packing_gain: pack only when padding would waste at least this fraction of the padded
    batch. Packed rows need an explicit block mask, padded rows of equal length take the
    attention kernel's causal fast path: measured on CPU, padding is 6-10% faster when there is
    little padding to remove (fixed-length data), packing far faster on ragged data.

    max_length: cut KTO's mismatched KL sequences to it (real ones already fit), and the
    capacity of a packed row.

    rejected=False: only each example's first sequence (chosen), for losses that never read the
    second (sft): half the tokens, half the forward.
    """
    kind = _kind(rows)
    if kind == "prompt":
        return collate_prompts(rows, pad_token_id=pad_token_id)
    prompts, completions = _sequences(rows, max_length)
    if not rejected:
        prompts, completions = prompts[: len(rows)], completions[: len(rows)]
    if packing and min_packing_gain > 0:
        lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
        packing = 1 - sum(lengths) / (len(lengths) * max(lengths)) >= min_packing_gain
    if packing:
        batch = pack(prompts, completions, row_tokens=max_length, pad_token_id=pad_token_id)
    else:
        batch = pad(prompts, completions, pad_token_id)
    batch["example_index"] = torch.tensor([r.get("index", -1) for r in rows], dtype=torch.long)
    if kind == "unpaired":
        batch["desirable"] = torch.tensor([bool(r["label"]) for r in rows], dtype=torch.bool)
    return batch


def _targets(prompt: list[int], completion: list[int]) -> list[int]:
    """Shifted labels of one sequence: position t predicts token t + 1 if it is a completion token."""
    if not prompt:
        raise ValueError("a sequence needs at least one prompt token to predict its completion")
    return [IGNORE] * (len(prompt) - 1) + list(completion) + [IGNORE]


def pad(prompts: list[list[int]], completions: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded [N, T] batch (T = longest sequence)."""
    n = len(prompts)
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
    t = max(lengths)
    input_ids = torch.full((n, t), pad_token_id, dtype=torch.long)
    labels = torch.full((n, t), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((n, t), dtype=torch.long)
    seq_index = torch.full((n, t), -1, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        length = lengths[i]
        input_ids[i, :length] = torch.tensor(p + c)
        labels[i, :length] = torch.tensor(_targets(p, c))
        attention_mask[i, :length] = 1
        seq_index[i, :length] = i
    # Right padding keeps every sequence at positions 0..len-1, exactly as when packed.
    position_ids = torch.arange(t).expand(n, t).clone()
    return {
        "input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask,
        "labels": labels, "loss_mask": labels != IGNORE, "seq_index": seq_index,
        "lengths": torch.tensor([len(c) for c in completions], dtype=torch.long),
    }


def pack(prompts: list[list[int]], completions: list[list[int]], *, row_tokens: int | None = None,
         pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Sequences concatenated into rows [R, S], positions restarting at 0 for each sequence.

    row_tokens=None: one row. Otherwise rows of at most max(row_tokens, longest sequence)
    tokens, filled first-fit in decreasing length. Why bounded rows: a packed row is one
    attention problem, and outside flash-attention's varlen kernels (CPU, sdpa) its mask is
    dense, so attention costs S^2 for the row instead of the sum of L^2 over its sequences.
    The end of a short row is padding, laid out as one more "sequence" (positions from 0,
    seq_index -1, no labels), so no real token attends to it.
    """
    seqs = [(p + c, _targets(p, c)) for p, c in zip(prompts, completions, strict=True)]
    capacity = max([len(ids) for ids, _ in seqs] + [row_tokens or sum(len(ids) for ids, _ in seqs)])
    rows: list[list[int]] = []  # sequence numbers per row
    free: list[int] = []
    for i in sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0])):
        fit = next((r for r, room in enumerate(free) if room >= len(seqs[i][0])), None)
        if fit is None:
            rows.append([])
            free.append(capacity)
            fit = len(rows) - 1
        rows[fit].append(i)
        free[fit] -= len(seqs[i][0])
    width = capacity - min(free)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    seq = torch.full((len(rows), width), -1, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for i in sorted(members):  # sequence order within a row keeps one-row packing in batch order
            tokens, targets = seqs[i]
            n = len(tokens)
            ids[r, at : at + n] = torch.tensor(tokens)
            # The last token of a sequence predicts nothing: the next token belongs to another one.
            labels[r, at : at + n] = torch.tensor(targets)
            seq[r, at : at + n] = i
            pos[r, at : at + n] = torch.arange(n)
            at += n
        pos[r, at:] = torch.arange(width - at)
    return {
        "input_ids": ids, "position_ids": pos, "labels": labels, "loss_mask": labels != IGNORE,
        "seq_index": seq, "lengths": torch.tensor([len(c) for c in completions], dtype=torch.long),
    }


def collate_prompts(rows: Sequence[dict], *, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts [B, P] for generate(): new tokens then follow every prompt directly."""
    prompts = [r["prompt_ids"] for r in rows]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p)
        attention_mask[i, width - len(p):] = 1
    return {
        "input_ids": input_ids, "attention_mask": attention_mask,
        "example_index": torch.tensor([r.get("index", -1) for r in rows], dtype=torch.long),
    }

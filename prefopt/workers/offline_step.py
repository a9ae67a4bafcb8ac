"""The worker-side maths of the offline losses: rows -> log-probs -> loss, on one rank.

    logps, info = forward_logps(model, data, indices, packing, rejected=True)
    loss, metrics, tokens = micro_batch_loss(model, data, indices, cfg, ref, packing)

Used by the policy role (with gradients) and the reference role (without, into the RefCache).
"""

from __future__ import annotations

import numpy as np
import torch

from prefopt.config import RunConfig

# Pack a micro-batch only when that removes at least this share of padded tokens (prefopt.data.collate).
MIN_PACKING_GAIN = 0.1


def forward_logps(model, data, indices: list[int], packing: bool, *, rejected: bool = True) -> tuple[dict, dict]:
    """One forward over the rows' sequences -> ({role: logps [B]}, {role: lengths [B], "tokens", ...}).

    Roles (prefopt.data.SEQUENCE_ROLES): pairs -> chosen, rejected; unpaired (KTO) -> completion,
    kl. rejected=False runs the chosen sequences only (sft). `packing` must come from
    prefopt.models.logprobs.resolve_packing for this model.
    """
    from prefopt.data import SEQUENCE_ROLES, collate
    from prefopt.models import accelerator_device
    from prefopt.models.logprobs import sequence_logps

    rows = data.rows(indices)
    batch = collate(rows, pad_token_id=data.pad_token_id, packing=packing, max_length=data.max_length,
                    min_packing_gain=MIN_PACKING_GAIN, rejected=rejected)
    batch = {k: v.to(accelerator_device(), non_blocking=True) for k, v in batch.items()}
    logps, lengths = sequence_logps(model, batch)  # [2B] (or [B] with rejected=False)
    b = len(rows)
    roles = SEQUENCE_ROLES[data.kind] if rejected else SEQUENCE_ROLES[data.kind][:1]
    info = {"tokens": int(batch["seq_index"].ge(0).sum())}
    if "desirable" in batch:
        info["desirable"] = batch["desirable"]
    out = {}
    for i, role in enumerate(roles):
        out[role], info[role] = logps[i * b : (i + 1) * b], lengths[i * b : (i + 1) * b]
    return out, info


class RowLogps:
    """For an engine worker holding tokenized data (self.data, self.packing): the summed
    completion log-probs of its rows, by role (chosen/rejected or completion/kl), fp32: the
    RefCache's values. The reference role answers them; so does a trained policy, as the
    reference of a round that starts from it (prefopt.algorithms.rounds)."""

    @torch.no_grad()
    def logps(self, indices: list[int]) -> dict[str, np.ndarray]:
        was_training = self.model.training
        self.model.eval()
        try:
            step = self.role.score_batch
            parts = [reference_logps(self.model, self.data, indices[s : s + step], self.packing)
                     for s in range(0, len(indices), step)]
        finally:
            self.model.train(was_training)
        return {role: torch.cat([p[role] for p in parts]).numpy() for role in parts[0]}

    def logps_of_rows(self, indices: list[int]) -> list[dict[str, float]]:
        """`logps` as one dict per row, the shape WorkerGroup.split gathers."""
        values = self.logps(indices)
        return [{role: float(v[i]) for role, v in values.items()} for i in range(len(indices))]


@torch.no_grad()
def reference_logps(model, data, indices: list[int], packing: bool) -> dict[str, torch.Tensor]:
    """Reference side: fp32 summed log-probs of the rows, by role (what the RefCache stores)."""
    logps, _ = forward_logps(model, data, indices, packing)
    return {role: v.float().cpu() for role, v in logps.items()}


def micro_batch_loss(model, data, indices: list[int], cfg: RunConfig, ref: dict[str, np.ndarray] | None,
                     packing: bool):
    """-> (loss scalar, metrics {name: float}, non-padding tokens) for one micro-batch.

    ref: reference log-probs of exactly these rows, {role: [B]} (None for reference-free losses).
    """
    from prefopt.losses import is_unpaired, needs_rejected, pairwise_loss, unpaired_loss

    name, params = cfg.loss_name, cfg.algorithm.loss_params()  # the loss fills in its defaults
    logps, info = forward_logps(model, data, indices, packing, rejected=needs_rejected(name))
    ref_of = (lambda role: torch.tensor(ref[role])) if ref is not None else (lambda role: None)  # a copy: live answers are read-only
    if name == "sft" and data.kind == "unpaired":
        # ReST's Improve data: the kept samples alone, as completions (the loss reads no other).
        out = pairwise_loss(name, policy_chosen_logps=logps["completion"], policy_rejected_logps=None,
                            ref_chosen_logps=None, ref_rejected_logps=None, chosen_lengths=info["completion"],
                            rejected_lengths=None, **params)
    elif is_unpaired(name):
        out = unpaired_loss(name, policy_logps=logps["completion"], ref_logps=ref_of("completion"),
                            desirable=info["desirable"], kl_policy_logps=logps["kl"],
                            kl_ref_logps=ref_of("kl"), lengths=info["completion"], **params)
    else:
        out = pairwise_loss(name, policy_chosen_logps=logps["chosen"], policy_rejected_logps=logps.get("rejected"),
                            ref_chosen_logps=ref_of("chosen"), ref_rejected_logps=ref_of("rejected"),
                            chosen_lengths=info["chosen"], rejected_lengths=info.get("rejected"), **params)
    return out.loss, out.metrics, info["tokens"]

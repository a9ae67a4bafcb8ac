"""Sampling from a causal LM: prompts (token ids) -> completions with their per-token log-probs.

    samples = generate(model, tokenizer, prompts, max_new_tokens=32, temperature=1.0,
                       top_k=0, top_p=1.0, greedy=False)
    samples[i] = {"completion_ids": [...], "logprobs": [...], "text": "..."}

The completion ends with its first EOS (included) or after max_new_tokens. The log-probs are
the model's own, log softmax of the raw logits (temperature 1, no top-k/top-p cut), of each
sampled token: the quantity a sequence-level KL and PPO's ratios are made of. They are taken
while sampling, one [B, V] step at a time, so no [B, C, V] tensor of logits is ever kept.
This is plain transformers `generate` (KV cache, left-padded prompts); under ZeRO-3 the caller
gathers the parameters first (EngineWorker.generate).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList


class _SampledLogProbs(LogitsProcessor):
    """Records log p(token) under the raw logits. Called once per new token, before the
    temperature and top-k/top-p warpers; the token chosen at step t is read at step t + 1."""

    def __init__(self):
        self.previous: torch.Tensor | None = None  # [B, V] log-probs of the last step
        self.logprobs: list[torch.Tensor] = []  # one [B] per generated token

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._read(input_ids[:, -1])
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _read(self, tokens: torch.Tensor) -> None:
        if self.previous is not None:
            self.logprobs.append(self.previous.gather(1, tokens[:, None]).squeeze(1))
            self.previous = None

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        self._read(last_tokens)
        return torch.stack(self.logprobs, dim=1)  # [B, C]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, greedy: bool = False) -> list[dict]:
    from prefopt.data.collate import collate_prompts
    from prefopt.data.tokenize import pad_token_id
    from prefopt.models import accelerator_device

    if not prompts:
        return []
    pad_id = pad_token_id(tokenizer)
    eos_id = tokenizer.eos_token_id
    batch = collate_prompts([{"prompt_ids": p} for p in prompts], pad_token_id=pad_id)
    device = accelerator_device()
    record = _SampledLogProbs()
    sampling = {} if greedy else {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    out = model.generate(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
        max_new_tokens=max_new_tokens, do_sample=not greedy, pad_token_id=pad_id, eos_token_id=eos_id,
        use_cache=True, logits_processor=LogitsProcessorList([record]), **sampling,
    )
    new = out[:, batch["input_ids"].shape[1]:]  # [B, C]
    logprobs = record.finish(new[:, -1]).cpu()  # [B, C]
    new = new.cpu()
    samples = []
    for ids, lp in zip(new.tolist(), logprobs, strict=True):
        end = ids.index(eos_id) + 1 if eos_id in ids else len(ids)  # generate pads after EOS
        samples.append({"completion_ids": ids[:end], "logprobs": lp[:end].tolist()})
    texts = tokenizer.batch_decode([s["completion_ids"] for s in samples], skip_special_tokens=True)
    for sample, text in zip(samples, texts, strict=True):
        sample["text"] = text
    return samples

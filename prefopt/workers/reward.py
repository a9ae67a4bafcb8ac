"""RewardWorker: the reward role's rank, scoring (prompt, completion) texts with a reward model.

The model is a ...ForSequenceClassification with one label (`build(model_path, train=False,
head="scalar")`), such as the export of algorithm reward_model. Its reward is the head's output
at the last token of prompt + completion + EOS, as that algorithm trained it.

Texts, not token ids, cross from the controller: each rank tokenizes them with the reward
model's OWN tokenizer, so a reward model built on another tokenizer than the policy's works.
The tokenization is training's (prefopt.data.tokenize): the prompt as the tokenizer does by
default (BOS where it adds one), the completion without special tokens, then one EOS.
"""

from __future__ import annotations

import torch

from prefopt.cluster.engine_worker import EngineWorker


class RewardWorker(EngineWorker):
    def __init__(self, config_json: str):
        super().__init__(config_json, role="reward")

    def tokenize(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        from prefopt.data.tokenize import _adds_bos

        tok = self.tokenizer
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        if _adds_bos(tok) and prompt_ids[:1] != [tok.bos_token_id]:
            prompt_ids = [tok.bos_token_id, *prompt_ids]
        completion_ids = tok(completion, add_special_tokens=False)["input_ids"]
        while completion_ids and completion_ids[-1] == tok.eos_token_id:  # exactly one EOS at the end
            completion_ids.pop()
        return prompt_ids, completion_ids + [tok.eos_token_id]

    @torch.no_grad()
    def score_texts(self, items: list[dict]) -> list[float]:
        """items [{prompt, completion}] (texts) -> one reward each."""
        from prefopt.data.collate import pad
        from prefopt.data.tokenize import pad_token_id
        from prefopt.models import accelerator_device

        self.model.eval()
        pad_id = pad_token_id(self.tokenizer)
        out: list[float] = []
        step = self.role.score_batch
        for s in range(0, len(items), step):
            part = [self.tokenize(x["prompt"], x["completion"]) for x in items[s : s + step]]
            batch = pad([p for p, _ in part], [c for _, c in part], pad_token_id=pad_id)
            batch = {k: v.to(accelerator_device()) for k, v in batch.items()}
            out += self.last_token_scalar(batch).cpu().tolist()
        return out

    @torch.no_grad()
    def judge(self, questions: list[str], answers: list[str]) -> list[float]:
        """p(answers[0]) / (p(answers[0]) + p(answers[1])) after each question (text), read from
        the judge's next-token probabilities of each answer's first token: a number, never text
        parsed from a generation. The judge is a causal LM (`build(..., head="lm")`)."""
        from prefopt.data.tokenize import pad_token_id
        from prefopt.models import accelerator_device

        tok = self.tokenizer
        first = [tok(a, add_special_tokens=False)["input_ids"][0] for a in answers]
        self.model.eval()
        pad_id = pad_token_id(tok)
        out: list[float] = []
        step = self.role.score_batch
        for s in range(0, len(questions), step):
            ids = [tok(q)["input_ids"] for q in questions[s : s + step]]
            # Right padding, read at each row's last token: with left padding the pad positions
            # attend to nothing, and the NaN they make reaches real tokens through attention.
            width = max(len(x) for x in ids)
            input_ids = torch.tensor([x + [pad_id] * (width - len(x)) for x in ids], device=accelerator_device())
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=accelerator_device())
            last = mask.sum(-1) - 1
            logits = self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
            logits = logits[torch.arange(len(ids), device=logits.device), last].float()  # [B, V]
            two = torch.log_softmax(logits[:, first], dim=-1)  # renormalised over the two answers
            out += two[:, 0].exp().cpu().tolist()
        return out

"""Evaluation on a built-in task: sample from the policy, score with the ground-truth reward,
and measure the sequence-level KL to the reference — one (KL, reward) point of the frontier.

    point = evaluate(policy_dir, reference_dir, cfg)   # {"eval/reward", "eval/kl", "eval/win_rate"}

KL is the DPO paper's quantity: E_{y ~ π}[log π(y|x) − log π_ref(y|x)], estimated from the
policy's own samples (summed over completion tokens, averaged over prompts). The win rate
compares each policy sample with a reference sample for the same prompt under the reward.

This runs on the controller with plain `transformers` (the tiny and small models of the
embedded default); a cluster-scale evaluation would shard generation over workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefopt.config import RunConfig


@dataclass
class EvalResult:
    metrics: dict[str, float]
    samples: list[dict]  # prompt, completion, reward, reference_completion, reference_reward


def _prompts(cfg: RunConfig) -> list[str]:
    from prefopt.tasks import get_task

    data = cfg.data.model_copy(update={"split": "test", "num_examples": cfg.eval.num_prompts})
    return [row["prompt"] for row in get_task(cfg.data.task).build(data, "prompt_only")][: cfg.eval.num_prompts]


@torch.no_grad()
def _sample(model, tokenizer, prompts: list[str], cfg: RunConfig, seed: int) -> tuple[torch.Tensor, int]:
    """-> (prompt + completion ids [N, P + C], P). Left padding keeps every prompt's end aligned."""
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(seed)
    out = model.generate(**enc, do_sample=True, top_k=0, top_p=1.0, temperature=cfg.eval.temperature,
                         max_new_tokens=cfg.eval.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    return out, enc.input_ids.shape[1]


@torch.no_grad()
def _completion_logps(model, ids: torch.Tensor, prompt_len: int, pad_id: int, eos_id: int) -> torch.Tensor:
    """Summed log-probs [N] of the generated tokens (up to and including the first EOS)."""
    attention = ids.ne(pad_id).long()
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits.float()
    logps = torch.log_softmax(logits[:, prompt_len - 1 : -1], dim=-1)  # (N, C, V)
    targets = ids[:, prompt_len:]
    token_logps = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N, C)
    # generate() pads after EOS: count the tokens up to and including the first EOS only.
    is_eos = (targets == eos_id).long()
    mask = (is_eos.cumsum(-1) - is_eos) == 0
    return (token_logps * mask).sum(-1)


def evaluate(policy_dir, reference_dir, cfg: RunConfig, *, seed: int = 0) -> EvalResult:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefopt.models import quiet_transformers
    from prefopt.tasks import get_task

    quiet_transformers()
    if cfg.data.task is None:
        raise ValueError("evaluation needs a built-in task with a ground-truth reward (data.task)")
    task = get_task(cfg.data.task)
    tokenizer = AutoTokenizer.from_pretrained(reference_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    reference = AutoModelForCausalLM.from_pretrained(reference_dir).eval()
    prompts = _prompts(cfg)
    ids, prompt_len = _sample(policy, tokenizer, prompts, cfg, seed)
    ref_ids, ref_prompt_len = _sample(reference, tokenizer, prompts, cfg, seed + 1)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    kl = (_completion_logps(policy, ids, prompt_len, pad, eos)
          - _completion_logps(reference, ids, prompt_len, pad, eos))  # (N,)
    completions = tokenizer.batch_decode(ids[:, prompt_len:], skip_special_tokens=True)
    ref_completions = tokenizer.batch_decode(ref_ids[:, ref_prompt_len:], skip_special_tokens=True)
    rewards = task.reward(prompts, completions)
    ref_rewards = task.reward(prompts, ref_completions)
    wins = [1.0 if r > q else 0.5 if r == q else 0.0 for r, q in zip(rewards, ref_rewards, strict=True)]
    metrics = {
        "eval/reward": sum(rewards) / len(rewards),
        "eval/kl": kl.mean().item(),
        "eval/win_rate": sum(wins) / len(wins),
        "eval/reference_reward": sum(ref_rewards) / len(ref_rewards),
    }
    samples = [{"prompt": p, "completion": c, "reward": r, "reference_completion": rc, "reference_reward": rr}
               for p, c, r, rc, rr in zip(prompts, completions, rewards, ref_completions, ref_rewards, strict=True)]
    return EvalResult(metrics, samples)

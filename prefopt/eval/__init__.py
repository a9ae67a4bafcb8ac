"""Evaluation on a built-in task: the policy's samples scored by the ground-truth reward, and
their sequence-level KL to the reference — one (KL, reward) point of the frontier per call.

    evaluator = Evaluator(cfg, tokenizer, reference_group)     # samples the reference once
    result = evaluator(policy_group)                           # {"eval/reward", "eval/kl", ...}

Sampling runs on the policy's own ranks (EngineWorker.generate, prompts split across them) and
the reference's log-probs of those samples on the reference's ranks (EngineWorker.score): no
model is loaded on the controller, and the same code evaluates a tiny model and an 8B one.

KL is the DPO paper's quantity: E_{y ~ π}[log π(y|x) − log π_ref(y|x)], estimated from the
policy's samples (log-probs summed over each completion, averaged over prompts). The win rate
compares each policy sample with the reference's own sample for the same prompt under the reward.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefopt.config import RunConfig


@dataclass
class EvalResult:
    metrics: dict[str, float]
    samples: list[dict]  # prompt, completion, reward, kl, reference_completion, reference_reward


def eval_prompts(cfg: RunConfig, tokenizer) -> tuple[list[str], list[list[int]]]:
    """The task's held-out prompts, tokenized exactly as training prompts are: (texts, ids)."""
    from prefopt.data.prepare import check

    data = cfg.data.model_copy(update={"split": "test", "num_examples": cfg.eval.num_prompts,
                                       "format": "prompt_only", "path": None, "on_bad_row": "skip"})
    table = check(cfg.model_copy(update={"data": data}), tokenizer).table
    return table["prompt"].to_pylist(), table["prompt_ids"].to_pylist()


class Evaluator:
    def __init__(self, cfg: RunConfig, tokenizer, reference):
        from prefopt.tasks import get_task

        if cfg.data.task is None:
            raise ValueError("evaluation needs a built-in task with a ground-truth reward (data.task)")
        self.task = get_task(cfg.data.task)
        self.reference = reference
        self.sampling = cfg.eval.sampling.model_dump(exclude={"seed"})
        # The same seed at every evaluation: successive points differ by the policy, not the dice.
        self.seed = cfg.eval.sampling.seed
        self.prompts, self.prompt_ids = eval_prompts(cfg, tokenizer)
        ref_samples = reference.split("generate", self.prompt_ids, self.sampling, self.seed)
        self.ref_texts = [s["text"] for s in ref_samples]
        self.ref_rewards = self.task.reward(self.prompts, self.ref_texts)
        self.reference_reward = sum(self.ref_rewards) / len(self.ref_rewards)

    def __call__(self, policy) -> EvalResult:
        samples = policy.split("generate", self.prompt_ids, self.sampling, self.seed)
        ref_logps = self.reference.split("score", [{"prompt_ids": p, "completion_ids": s["completion_ids"]}
                                                   for p, s in zip(self.prompt_ids, samples, strict=True)])
        kls = [sum(s["logprobs"]) - sum(r) for s, r in zip(samples, ref_logps, strict=True)]
        texts = [s["text"] for s in samples]
        rewards = self.task.reward(self.prompts, texts)
        wins = [1.0 if r > q else 0.5 if r == q else 0.0 for r, q in zip(rewards, self.ref_rewards, strict=True)]
        n = len(rewards)
        metrics = {
            "eval/reward": sum(rewards) / n,
            "eval/kl": sum(kls) / n,
            "eval/win_rate": sum(wins) / n,
            "eval/reference_reward": self.reference_reward,
            "eval/completion_tokens": sum(len(s["completion_ids"]) for s in samples) / n,
        }
        rows = [{"prompt": p, "completion": c, "reward": r, "kl": k, "reference_completion": rc,
                 "reference_reward": rr}
                for p, c, r, k, rc, rr in zip(self.prompts, texts, rewards, kls, self.ref_texts,
                                              self.ref_rewards, strict=True)]
        return EvalResult(metrics, rows)

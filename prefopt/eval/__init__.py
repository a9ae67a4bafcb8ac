"""Evaluation on a built-in task: the policy's samples scored by the ground-truth reward, and
their sequence-level KL to the reference — one (KL, reward) point of the frontier per call.

    evaluator = Evaluator(cfg, tokenizer, reference_group)     # samples the reference once
    result = evaluator(policy_group)                           # {"eval/reward", "eval/kl", ...}

Sampling runs on the policy's own ranks (EngineWorker.generate, prompts split across them) and
the reference's log-probs of those samples on the reference's ranks (EngineWorker.score): no
model is loaded on the controller, and the same code evaluates a tiny model and an 8B one.

KL is the DPO paper's quantity: E_{y ~ π}[log π(y|x) − log π_ref(y|x)], estimated from the
policy's samples (log-probs summed over each completion: the k1 estimator of the sequence KL).
With eval.samples_per_prompt = K, each prompt is sampled K times; a prompt's samples are averaged
first, and every metric comes with its standard error over prompts (`eval/reward_se`, ...). The
win rate compares the policy's j-th sample of a prompt with the reference's j-th under the reward,
a tie counting one half.

What makes two evaluations comparable — the prompts, the sampler, K, the KL estimator and the
reward — is hashed into `Evaluator.fingerprint`, logged as the run's tag `eval.fingerprint`:
`prefopt compare` draws only runs that share it on one plane.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from prefopt.config import RunConfig


@dataclass
class EvalResult:
    metrics: dict[str, float]
    samples: list[dict]  # prompt, completion, reward, kl, reference_completion, reference_reward


def eval_prompts(cfg: RunConfig, tokenizer) -> tuple[list[str], list[list[int]]]:
    """The task's held-out prompts, tokenized exactly as training prompts are: (texts, ids)."""
    from prefopt.data.prepare import check

    # The same prompts whatever data.seed says: a sweep's seeds change the training, never what
    # its trials are evaluated on (their points share one plane, one eval.fingerprint).
    data = cfg.data.model_copy(update={"split": "test", "num_examples": cfg.eval.num_prompts, "seed": 0,
                                       "format": "prompt_only", "path": None, "on_bad_row": "skip"})
    table = check(cfg.model_copy(update={"data": data}), tokenizer).table
    return table["prompt"].to_pylist(), table["prompt_ids"].to_pylist()


KL_ESTIMATOR = "k1-sequence"  # log π − log π_ref summed over a completion, averaged over samples


class Evaluator:
    def __init__(self, cfg: RunConfig, tokenizer, reference):
        from prefopt.tasks import get_task

        if cfg.data.task is None:
            raise ValueError("evaluation needs a built-in task with a ground-truth reward (data.task)")
        self.task = get_task(cfg.data.task)
        self.reference = reference
        self.k = cfg.eval.samples_per_prompt
        self.sampling = cfg.eval.sampling.model_dump(exclude={"seed"})
        # The same seed at every evaluation: successive points differ by the policy, not the dice.
        self.seed = cfg.eval.sampling.seed
        self.prompts, self.prompt_ids = eval_prompts(cfg, tokenizer)
        self.fingerprint = fingerprint(cfg.data.task, self.prompts, cfg.eval.sampling.model_dump(), self.k,
                                       cfg.rollout.engine)
        # Each prompt k times in a row: the workers draw k different completions of it.
        self.sampled_prompts = [p for p in self.prompts for _ in range(self.k)]
        self.sampled_ids = [ids for ids in self.prompt_ids for _ in range(self.k)]
        ref_samples = reference.split("generate", self.sampled_ids, self.sampling, self.seed)
        self.ref_texts = [s["text"] for s in ref_samples]
        self.ref_rewards = self.task.reward(self.sampled_prompts, self.ref_texts)
        self.reference_reward = sum(self.ref_rewards) / len(self.ref_rewards)
        self.limits = self._limits(cfg.eval.limit_samples) if cfg.eval.limit_samples else None

    def _limits(self, n: int) -> dict:
        """Best-of-n and the KL-regularised optimum from n samples of the reference per prompt,
        scored by the task's reward: the limits a method's frontier is drawn under. The reference
        is sampled as itself (temperature 1, no top-k or top-p cut), whatever eval.sampling says."""
        import numpy as np

        from prefopt.eval.limits import best_of_n, kl_optimum

        plain = self.sampling | {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "greedy": False}
        ids = [p for p in self.prompt_ids for _ in range(n)]
        texts = [s["text"] for s in self.reference.split("generate", ids, plain, self.seed + 1)]
        rewards = np.array(self.task.reward([p for p in self.prompts for _ in range(n)], texts)).reshape(-1, n)
        return {"samples_per_prompt": n, "fingerprint": self.fingerprint,
                "best_of_n": [asdict(p) for p in best_of_n(rewards)],
                "optimum": [asdict(p) for p in kl_optimum(rewards)]}

    def __call__(self, policy) -> EvalResult:
        from prefopt.eval.stats import mean_and_se, per_prompt_means

        samples = policy.split("generate", self.sampled_ids, self.sampling, self.seed)
        ref_logps = self.reference.split("score", [{"prompt_ids": p, "completion_ids": s["completion_ids"]}
                                                   for p, s in zip(self.sampled_ids, samples, strict=True)])
        kls = [sum(s["logprobs"]) - sum(r) for s, r in zip(samples, ref_logps, strict=True)]
        texts = [s["text"] for s in samples]
        rewards = self.task.reward(self.sampled_prompts, texts)
        wins = [1.0 if r > q else 0.5 if r == q else 0.0 for r, q in zip(rewards, self.ref_rewards, strict=True)]
        metrics = {}
        for name, values in (("reward", rewards), ("kl", kls), ("win_rate", wins)):
            metrics[f"eval/{name}"], metrics[f"eval/{name}_se"] = mean_and_se(per_prompt_means(values, self.k))
        metrics |= {
            "eval/reference_reward": self.reference_reward,
            "eval/completion_tokens": sum(len(s["completion_ids"]) for s in samples) / len(samples),
        }
        rows = [{"prompt": p, "completion": c, "reward": r, "kl": k, "reference_completion": rc,
                 "reference_reward": rr}
                for p, c, r, k, rc, rr in zip(self.sampled_prompts, texts, rewards, kls, self.ref_texts,
                                              self.ref_rewards, strict=True)]
        return EvalResult(metrics, rows)


def fingerprint(task: str, prompts: list[str], sampling: dict, samples_per_prompt: int, engine: str = "hf") -> str:
    """What makes two evaluations comparable, hashed: the task (its reward), the prompt texts, the
    sampler (seed included, and the engine: vLLM draws other samples from the same seed),
    samples per prompt and the KL estimator."""
    import hashlib
    import json

    spec = {"task": task, "prompts": hashlib.sha256("\x00".join(prompts).encode()).hexdigest(),
            "sampling": sampling, "samples_per_prompt": samples_per_prompt, "kl": KL_ESTIMATOR}
    if engine != "hf":  # hf runs keep the fingerprints they had before there was a choice
        spec["engine"] = engine
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

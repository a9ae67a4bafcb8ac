"""VLLMEngine: one vLLM engine as a Ray actor, run by the vLLM environment's python.

It runs in another virtual environment (vLLM pins transformers, numpy and fastapi below what
prefopt uses), so this module imports nothing of prefopt and only the standard library at the
top; the same Python, torch and Ray on both sides let tensors and actor calls cross unchanged.

    engine.generate(prompts, sampling, seeds)   completions with the engine's log-probs
    engine.receive(bucket) ... engine.commit()  a weight sync: named tensors in buckets, then
                                                one in-place reload of all of them
    engine.logprobs(sequences)                  per-token log-probs of given sequences (the check)
"""

from __future__ import annotations

import os
import time


class VLLMEngine:
    def __init__(self, model_dir: str, dtype: str, settings: dict):
        # No usage statistics leave the cluster; the engine runs inside this actor, not in a
        # subprocess of its own, so a weight sync can hand it tensors.
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        os.environ.setdefault("DO_NOT_TRACK", "1")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.get("cpu_kv_cache_gb", 1)))
        from vllm import LLM

        self.llm = LLM(model=model_dir, dtype=dtype, seed=0, enforce_eager=True, generation_config="vllm",
                       tensor_parallel_size=settings.get("tensor_parallel_size", 1),
                       gpu_memory_utilization=settings.get("gpu_memory_utilization", 0.5),
                       max_model_len=settings.get("max_model_len"), disable_log_stats=True)
        self.eos = self.llm.get_tokenizer().eos_token_id
        self.received: list = []

    def versions(self) -> dict[str, str]:
        import sys

        import ray
        import torch
        import vllm

        return {"python": sys.version.split()[0], "torch": torch.__version__, "ray": ray.__version__,
                "vllm": vllm.__version__}

    def generate(self, prompts: list[list[int]], sampling: dict, seeds: list[int]) -> list[dict]:
        """A completion per prompt: [{completion_ids, logprobs}] as EngineWorker.generate gives
        them (the EOS included when it ended one), the log-probs the engine's own of the raw
        logits (vLLM's default raw_logprobs). seeds: one per prompt, so a prompt's draw does not
        depend on which engine or batch it lands in."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        greedy = sampling.get("greedy", False)
        params = [SamplingParams(max_tokens=sampling["max_new_tokens"], logprobs=0, detokenize=False,
                                 temperature=0.0 if greedy else sampling.get("temperature", 1.0),
                                 top_k=0 if greedy else sampling.get("top_k", 0),
                                 top_p=1.0 if greedy else sampling.get("top_p", 1.0),
                                 seed=None if greedy else seed, stop_token_ids=[self.eos])
                  for seed in seeds]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        samples = []
        for out in outs:
            o = out.outputs[0]
            ids = list(o.token_ids)
            logprobs = [step[token].logprob for step, token in zip(o.logprobs, ids, strict=True)]
            samples.append({"completion_ids": ids, "logprobs": logprobs})
        return samples

    def logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """log p(token | the tokens before) of each token after the first of each sequence."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False)
        return [[step[token].logprob for step, token in zip(out.prompt_logprobs[1:], seq[1:], strict=True)]
                for out, seq in zip(outs, sequences, strict=True)]

    def receive(self, bucket: list[tuple[str, object]]) -> int:
        """One bucket of a sync: (Hugging Face name, tensor) pairs, kept until commit. -> tensors held."""
        self.received += bucket
        return len(self.received)

    def commit(self) -> dict[str, float]:
        """Load every received tensor into the model in place (vLLM's reload_weights: it repacks
        what its kernels need, which a plain load_weights would skip) and drop them."""
        t0 = time.perf_counter()
        weights, self.received = self.received, []
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        return {"tensors": float(len(weights)), "seconds": time.perf_counter() - t0}

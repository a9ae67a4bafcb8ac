"""PPO rollout throughput: the policy's own ranks (rollout.engine: hf) against a vLLM engine
(rollout.engine: vllm), on the same model, prompts and sampler, in one run.

    .venv/bin/python benchmarks/rollout_throughput.py               # needs `make vllm-env`
    .venv/bin/python benchmarks/rollout_throughput.py --layers 2 --width 64 --iterations 3   # a quick look

What is measured, per rollout batch (`--prompts` task prompts, one completion each, temperature
1, at most `--max-new-tokens` tokens, ending at the first EOS):
- hf: the policy rank's `generate` (Hugging Face, KV cache; the log-probs recorded while sampling);
- vllm: the engine's `generate` alone, then what PPO pays in all: the engine's samples plus the
  policy's forward for their log-probs (rollout.engine: vllm's samples carry the policy's own),
  and apart from both, one weight sync (gather, send, reload) and its check.
The two run alternately, batch by batch, so that other load on the machine falls on both; the
first `--warmup` batches are left out. Everything is fp32, one policy rank, one engine, each
with one CPU (two cores: they never compute at the same time here). Tokens are completion
tokens up to and including EOS.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8, help="width / heads >= 32 (vLLM's CPU attention)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=5)
    args = parser.parse_args()

    from rich.console import Console

    from prefopt.cluster.ray_setup import connect
    from prefopt.cluster.worker_group import WorkerGroup
    from prefopt.config import TinyModelConfig, load_config
    from prefopt.data.prepare import check
    from prefopt.models import save_tiny
    from prefopt.rollout.sampler import VLLMSampler
    from prefopt.workers.ppo import PPOPolicyWorker

    work = Path(tempfile.mkdtemp(prefix="rollout-bench-"))
    tiny = TinyModelConfig(hidden_size=args.width, intermediate_size=4 * args.width, num_hidden_layers=args.layers,
                           num_attention_heads=args.heads, num_key_value_heads=args.heads)
    model_dir = save_tiny(work / "model", tiny)
    cfg = load_config(None, [f"model.path={model_dir}", "data.task=imdb_sentiment", "data.format=prompt_only",
                             "algorithm.name=ppo", f"data.num_examples={args.prompts}", "rollout.engine=vllm",
                             "model.dtype=float32", f"output_dir={work / 'run'}"])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = check(cfg, tokenizer).table["prompt_ids"].to_pylist()[: args.prompts]
    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "greedy": False}
    connect(cfg.cluster, [cfg.policy, cfg.rollout.as_role(on_gpus=False)])
    quiet = Console(file=io.StringIO())
    policy = WorkerGroup(PPOPolicyWorker, cfg.policy, cfg.cluster, name="policy", key="policy",
                         init_args=(cfg.model_dump_json(),))
    policy.call("setup", str(model_dir), schedule={"max_steps": 10})
    t0 = time.perf_counter()
    sampler = VLLMSampler(cfg, policy, str(model_dir), tokenizer, prompts[:4], quiet)
    start_seconds = time.perf_counter() - t0

    rows: dict[str, list[float]] = {"hf": [], "vllm engine": [], "vllm + policy log-probs": []}
    sync: list[float] = []
    drawn: dict[str, list[tuple[int, float]]] = {"hf": [], "vllm": []}  # (tokens, policy log-prob) per sample
    for i in range(args.warmup + args.iterations):
        t = time.perf_counter()
        hf = policy.split("generate", prompts, sampling, i)
        hf_s = time.perf_counter() - t
        t = time.perf_counter()
        sampler.updated(i + 1)  # a sync and its check, as after every PPO update
        sync_s = time.perf_counter() - t
        seeds = [i * 1_000_003 + k for k in range(len(prompts))]
        import ray

        t = time.perf_counter()
        engine = ray.get(sampler.engines[0].generate.remote(prompts, sampling, seeds))
        engine_s = time.perf_counter() - t
        t = time.perf_counter()
        full = sampler.split("generate", prompts, sampling, i)
        full_s = time.perf_counter() - t
        if i >= args.warmup:
            rows["hf"].append(sum(len(s["completion_ids"]) for s in hf) / hf_s)
            rows["vllm engine"].append(sum(len(s["completion_ids"]) for s in engine) / engine_s)
            rows["vllm + policy log-probs"].append(sum(len(s["completion_ids"]) for s in full) / full_s)
            sync.append(sync_s)
            drawn["hf"] += [(len(s["completion_ids"]), sum(s["logprobs"])) for s in hf]
            drawn["vllm"] += [(len(s["completion_ids"]), sum(s["logprobs"])) for s in full]
    sampler.shutdown()
    policy.shutdown()

    import torch

    params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    print(f"CPU: {cpu_model()}; {os.cpu_count()} CPUs; torch {torch.__version__}, vLLM {sampler.versions['vllm']}; fp32")
    print(f"model: {args.layers} layers x {args.width} wide, {args.heads} heads ({params / 1e6:.1f}M parameters); "
          f"{len(prompts)} prompts, <= {args.max_new_tokens} new tokens, temperature 1; "
          f"{args.iterations} batches measured after {args.warmup} warm-up")
    print(f"engine start: {start_seconds:.1f} s")
    base = statistics.median(rows["hf"])
    print(f"{'sampler':<26}{'tokens/s (median)':>18}{'min':>8}{'max':>8}{'vs hf':>8}")
    for name, values in rows.items():
        med = statistics.median(values)
        print(f"{name:<26}{med:>18.1f}{min(values):>8.1f}{max(values):>8.1f}{med / base:>8.2f}")
    print(f"weight sync + check: {statistics.median(sync) * 1000:.0f} ms median per update")
    # The same distribution? Both samplers' completions, scored by the policy: lengths and log-probs
    # agree within their standard errors when the engine samples what the policy would.
    from prefopt.eval.stats import mean_and_se

    for name, pairs in drawn.items():
        length, length_se = mean_and_se([n for n, _ in pairs])
        logp, logp_se = mean_and_se([lp for _, lp in pairs])
        print(f"{name:<5} samples: {len(pairs)}, completion tokens {length:.2f} ± {length_se:.2f}, "
              f"policy log-prob per completion {logp:.2f} ± {logp_se:.2f}")


if __name__ == "__main__":
    main()

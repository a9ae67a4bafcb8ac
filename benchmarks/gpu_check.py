"""Check and measure prefopt's GPU path in one process: no Ray, no MLflow, one rank.

On a GPU machine with prefopt installed (`make install`; Ray and MLflow are not used), from the
repository root:

    DS_ACCELERATOR=cuda .venv/bin/python benchmarks/gpu_check.py --out gpu.json 2>&1 | tee gpu.log

Here, on CPU, the same code on a tiny model:

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/gpu_check.py --quick

It drives prefopt's engine workers directly (PolicyWorker, EngineWorker: the classes Ray wraps
elsewhere) on a Llama built from a config (hidden 1024, 16 layers, 16 heads, ~200M parameters)
with the tiny model's tokenizer (--assets DIR, a directory written by `prefopt model build-tiny
DIR`; by default one is built first, from the built-in task's reviews), and synthetic preference pairs written
as TokenizedData (chosen completions from one half of the vocabulary, rejected from the
other, so DPO has something to learn in 20 steps). Sections, each guarded (a failing one
prints its traceback and the others still run; the JSON is rewritten after each):

  env        process group backend (nccl on a GPU), GPU, torch/transformers/deepspeed versions
  stage0     policy in bf16 on one rank: ZeRO stage 0 (effective_zero_stage: one rank, no offload)
  fp32       a frozen fp32 copy: sampled log-probs vs a separate forward (score)
  zero3      policy in bf16 with ZeRO-3 parameter offload (parameters in pinned CPU memory)

For each policy: greedy generation of 64 prompts x 128 new tokens (new tokens/s); for ZeRO-3
also without the gather-once context (EngineWorker._gathered_for_generation patched to a
nullcontext), capped at 32 new tokens because every token then streams every layer from the
CPU (the gather-once path is timed at the same cap for the comparison); sampled log-probs vs
`score` (bf16); then 20 DPO steps (tokens/s over steps 3.., peak GPU memory, first loss, which
must be ln 2: the reference log-probs are the policy's own, computed before training in the
very micro-batches the steps will read). Checks: backend nccl, first loss = ln 2, losses
finite and decreasing, greedy outputs equal between stage 0 and ZeRO-3 (with and without the
gather-once context), fp32 log-prob gap < 1e-3, generate leaves the CPU and CUDA RNG states as
they were (its docstring's promise). Exit status 1 when a check fails or a section raises.
Options: --quick (tiny sizes), --dtype, --skip stage0 fp32 zero3, --out, --deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import gc
import hashlib
import json
import math
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
os.environ.setdefault("DS_ACCELERATOR", "cuda" if CUDA else "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

LN2 = math.log(2.0)

SIZES = {
    "full": {
        "hidden": 1024, "layers": 16, "heads": 16, "kv_heads": 16, "intermediate": 2816, "max_positions": 1024,
        "micro_batch": 16, "steps": 20, "lr": 1e-4, "prompt": (8, 64), "completion": (32, 224), "max_length": 512,
        "gen_prompts": 64, "gen_prompt_len": (8, 32), "gen_tokens": 128, "gen_tokens_no_gather": 32,
        "score_prompts": 16, "score_tokens": 32,
    },
    "quick": {
        "hidden": 64, "layers": 2, "heads": 4, "kv_heads": 4, "intermediate": 128, "max_positions": 256,
        "micro_batch": 4, "steps": 6, "lr": 1e-3, "prompt": (4, 12), "completion": (4, 20), "max_length": 64,
        "gen_prompts": 8, "gen_prompt_len": (3, 8), "gen_tokens": 16, "gen_tokens_no_gather": 8,
        "score_prompts": 4, "score_tokens": 8,
    },
}

results: dict = {"checks": {}, "errors": {}}


# ----------------------------------------------------------------------------- small helpers


@contextlib.contextmanager
def guard(name: str):
    """Run one section; on an exception print it, record it, and go on with the next section."""
    print(f"\n=== {name}", flush=True)
    start = time.perf_counter()
    try:
        yield
    except Exception:
        traceback.print_exc()
        results["errors"][name] = traceback.format_exc()
    results.setdefault("section_seconds", {})[name] = round(time.perf_counter() - start, 1)
    print(f"=== {name}: {time.perf_counter() - start:.1f}s", flush=True)


def greedy_check(name: str, eq: dict, dtype: str) -> None:
    """Greedy completions are a check in fp32. In bf16 the two engines' kernels round differently
    (measured on an H100: long greedy completions part after tens of tokens), so there it is a
    measurement, printed, not a check."""
    if dtype == "float32":
        check(name, eq["equal"] == eq["of"], json.dumps(eq))
    else:
        print(f"  {name} ({dtype}: measured, not checked): {json.dumps(eq)}", flush=True)


def check(name: str, ok: bool, detail: str) -> None:
    results["checks"][name] = {"ok": bool(ok), "detail": detail}
    print(f"  [{'ok' if ok else 'FAIL'}] {name}: {detail}", flush=True)


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def gib(n: float) -> float:
    return round(n / 2**30, 3)


def reset_peak() -> None:
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return gib(torch.cuda.max_memory_allocated()) if CUDA else None


def allocated_gib() -> float | None:
    return gib(torch.cuda.memory_allocated()) if CUDA else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def release() -> None:
    """After a worker goes out of scope: free its engine (ZeRO-3 engines sit in reference cycles)."""
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


@contextlib.contextmanager
def ray_stub():
    """PolicyWorker._reference runs `import ray` on every micro-batch, even with a cached
    reference; where Ray is not installed, an empty module stands in while training runs."""
    try:
        import ray  # noqa: F401

        have_ray = True
    except ImportError:
        have_ray = False
    if have_ray:
        yield
        return
    saved = sys.modules.get("ray", "absent")
    sys.modules["ray"] = types.ModuleType("ray")
    try:
        yield
    finally:
        if saved == "absent":
            del sys.modules["ray"]
        else:
            sys.modules["ray"] = saved


# ----------------------------------------------------------------------------- model, data, config


def build_model_dir(out: Path, tokenizer_dir: Path, s: dict) -> dict:
    """A randomly initialised Llama of the given size, saved (fp32) with the tiny tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=s["hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
        max_position_embeddings=s["max_positions"], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tok),
            "hidden": s["hidden"], "layers": s["layers"], "heads": s["heads"]}


def write_pairs(out_dir: Path, tok_ids: dict, s: dict, num_rows: int) -> str:
    """Synthetic preference pairs as TokenizedData: chosen tokens from the lower half of the
    ordinary vocabulary, rejected from the upper half, prompts from all of it."""
    from prefopt.data.report import DataReport
    from prefopt.data.store import to_table, write

    rng = np.random.default_rng(0)
    first, vocab = tok_ids["first_ordinary"], tok_ids["vocab_size"]
    middle = (first + vocab) // 2

    def ids(lo: int, hi: int, lengths: tuple[int, int]) -> list[int]:
        return rng.integers(lo, hi, rng.integers(lengths[0], lengths[1] + 1)).tolist()

    columns: dict[str, list] = {"row": [], "prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for row in range(num_rows):
        columns["row"].append(row + 1)
        columns["prompt_ids"].append([tok_ids["bos"]] + ids(first, vocab, s["prompt"]))
        columns["chosen_ids"].append(ids(first, middle, s["completion"]) + [tok_ids["eos"]])
        columns["rejected_ids"].append(ids(middle, vocab, s["completion"]) + [tok_ids["eos"]])
    report = DataReport("synthetic", "preference", num_rows, num_rows)
    fingerprint = hashlib.sha256(json.dumps([num_rows, s["prompt"], s["completion"], vocab]).encode()).hexdigest()
    manifest = {
        "fingerprint": fingerprint, "format": "preference", "num_rows": num_rows,
        "max_length": s["max_length"], "max_prompt_length": s["prompt"][1] + 1,
        "pad_token_id": tok_ids["pad"], "eos_token_id": tok_ids["eos"], "report": report.to_dict(),
    }
    return str(write(out_dir, to_table(columns), manifest))


def make_config(model_dir: str, out_dir: str, s: dict, *, dtype: str, zero3_offload: bool, threads: int):
    from prefopt.config import load_config

    overrides = [
        f"model.path={model_dir}", f"model.dtype={dtype}", f"output_dir={out_dir}",
        f"policy.micro_batch_size={s['micro_batch']}", f"policy.gpus_per_worker={1 if CUDA else 0}",
        f"policy.cpus_per_worker={threads}", f"train.lr={s['lr']}", f"train.max_steps={s['steps']}",
        f"data.max_length={s['max_length']}", f"data.max_prompt_length={s['prompt'][1] + 1}",
    ]
    if zero3_offload:
        overrides += ["policy.deepspeed.zero_stage=3", "policy.deepspeed.offload_param=true"]
    return load_config(None, overrides)


class OwnReference:
    """A RefCache stand-in (PolicyWorker.setup calls .read() once, right after building the
    engine): the reference log-probs of every row, computed on the policy's own model before
    training, in the very micro-batches the training steps will read. So the first DPO loss
    is exactly ln 2 (same rows, same packing, same kernels)."""

    def __init__(self, worker, data_path: str):
        self.worker, self.data_path = worker, data_path

    def read(self) -> dict[str, np.ndarray]:
        from prefopt.cluster.sharding import StepPlan
        from prefopt.data import TokenizedData
        from prefopt.workers.offline_step import reference_logps

        w = self.worker
        data = TokenizedData.open(self.data_path)
        plan = StepPlan(num_rows=data.num_rows, micro_batch_size=w.role.micro_batch_size,
                        grad_accum=w.cfg.train.gradient_accumulation_steps, world_size=1, seed=w.cfg.data.seed)
        out = {"chosen": np.zeros(data.num_rows, np.float32), "rejected": np.zeros(data.num_rows, np.float32)}
        for step in range(plan.steps_per_epoch):
            for micro in range(plan.grad_accum):
                rows = plan.rows(step, micro, 0)
                values = reference_logps(w.engine, data, rows, w.packing)  # the engine, as training calls it
                for role in out:
                    out[role][rows] = values[role].numpy()
        return out


# ----------------------------------------------------------------------------- measurements


def random_prompts(tok_ids: dict, count: int, lengths: tuple[int, int], seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[tok_ids["bos"]] + rng.integers(tok_ids["first_ordinary"], tok_ids["vocab_size"],
                                            rng.integers(lengths[0], lengths[1] + 1)).tolist()
            for _ in range(count)]


def timed_generate(worker, prompts: list[list[int]], max_new_tokens: int, *, greedy: bool = True, seed: int = 0):
    sampling = {"max_new_tokens": max_new_tokens, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "greedy": greedy}
    reset_peak()
    sync()
    start = time.perf_counter()
    samples = worker.generate(prompts, sampling, seed)
    sync()
    seconds = time.perf_counter() - start
    new = sum(len(x["completion_ids"]) for x in samples)
    stats = {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "new_tokens": new,
             "seconds": round(seconds, 3), "new_tokens_per_s": round(new / seconds, 1), "peak_gib": peak_gib()}
    print(f"  generate {len(prompts)} x {max_new_tokens}: {new} new tokens in {seconds:.2f}s "
          f"= {new / seconds:.1f} tok/s, peak {stats['peak_gib']} GiB", flush=True)
    return samples, stats


def compare_greedy(a: list[dict], b: list[dict], cap: int | None = None) -> dict:
    """How many completions are equal (b against a's first `cap` tokens when capped)."""
    equal, first_diff = 0, None
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        xs = x["completion_ids"][:cap] if cap else x["completion_ids"]
        if xs == y["completion_ids"]:
            equal += 1
        elif first_diff is None:
            pos = next((j for j, (u, v) in enumerate(zip(xs, y["completion_ids"], strict=False)) if u != v),
                       min(len(xs), len(y["completion_ids"])))
            first_diff = {"prompt": i, "token": pos}
    return {"equal": equal, "of": len(a), "first_difference": first_diff}


def logprob_gap(worker, prompts: list[list[int]], max_new_tokens: int) -> dict:
    """Sampled log-probs (taken while generating, KV cache) vs `score` (one full forward)."""
    sampling = {"max_new_tokens": max_new_tokens, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "greedy": False}
    samples = worker.generate(prompts, sampling, 1)
    scored = worker.score([{"prompt_ids": p, "completion_ids": x["completion_ids"]}
                           for p, x in zip(prompts, samples, strict=True)])
    gaps = []
    for x, values in zip(samples, scored, strict=True):
        if len(values) != len(x["logprobs"]):
            raise AssertionError(f"score gave {len(values)} values for {len(x['logprobs'])} tokens")
        gaps += [abs(a - b) for a, b in zip(x["logprobs"], values, strict=True)]
    out = {"tokens": len(gaps), "max_abs_diff": float(max(gaps)), "mean_abs_diff": float(np.mean(gaps))}
    print(f"  sampled vs score log-probs over {len(gaps)} tokens: max |diff| {out['max_abs_diff']:.2e}, "
          f"mean {out['mean_abs_diff']:.2e}", flush=True)
    return out


def train(worker, steps: int) -> dict:
    """steps DPO steps; tokens/s over steps 3.. (the first two warm up kernels and the allocator)."""
    reset_peak()
    with ray_stub():
        metrics = worker.train_steps(0, 1) + worker.train_steps(1, steps - 1)
    losses = [m["loss"] for m in metrics]
    timed = metrics[2:] if len(metrics) > 3 else metrics
    tokens, seconds = sum(m["tokens"] for m in timed), sum(m["step_seconds"] for m in timed)
    out = {
        "steps": steps, "tokens_per_step": round(tokens / len(timed)), "tokens_per_s": round(tokens / seconds, 1),
        "step_seconds_mean": round(seconds / len(timed), 4), "first_step_seconds": round(metrics[0]["step_seconds"], 3),
        "peak_gib": peak_gib(), "first_loss": losses[0], "last_loss": losses[-1], "losses": [round(x, 5) for x in losses],
        "accuracy_last": metrics[-1].get("rewards/accuracies"),
    }
    print(f"  {steps} steps: {out['tokens_per_s']} tokens/s ({out['tokens_per_step']} tokens/step, "
          f"{out['step_seconds_mean']}s/step), peak {out['peak_gib']} GiB", flush=True)
    print(f"  losses: {' '.join(f'{x:.4f}' for x in losses)}", flush=True)
    return out


def check_training(label: str, t: dict) -> None:
    losses = t["losses"]
    check(f"{label}: first loss = ln 2", abs(t["first_loss"] - LN2) < 1e-3,
          f"{t['first_loss']:.6f} vs {LN2:.6f} (|diff| {abs(t['first_loss'] - LN2):.1e})")
    k = min(3, len(losses) // 2)
    first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    check(f"{label}: losses finite and decreasing", all(map(math.isfinite, losses)) and last < first,
          f"mean of first {k} {first:.4f} -> last {k} {last:.4f}")


def engine_facts(worker, info: dict) -> dict:
    params = list(worker.model.parameters())
    return {"zero_stage": info.get("zero_stage"), "packing": info.get("packing"),
            "param_bytes_on_rank": info.get("param_bytes"), "param_dtype": str(params[0].dtype),
            "optimizer": type(worker.engine.optimizer).__name__ if hasattr(worker.engine, "optimizer") else None,
            "allocated_after_setup_gib": allocated_gib()}


# ----------------------------------------------------------------------------- sections


def section_env(args, backend: str) -> None:
    import deepspeed
    import transformers

    from prefopt.cluster.engine_worker import EngineWorker
    from prefopt.config import load_config

    env = {
        "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__, "deepspeed": deepspeed.__version__,
        "ds_accelerator": deepspeed.get_accelerator()._name, "cuda_available": CUDA,
    }
    if CUDA:
        env |= {"gpu": torch.cuda.get_device_name(0), "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
                "gpu_memory_gib": gib(torch.cuda.get_device_properties(0).total_memory),
                "nccl": str(torch.cuda.nccl.version()), "bf16_supported": torch.cuda.is_bf16_supported()}
    results["env"] = env
    # The first worker joins the process group; later ones find it initialised and skip it.
    w = EngineWorker(load_config(None, [f"policy.cpus_per_worker={args.threads}"]).model_dump_json())
    join(w, args, backend)
    env["backend"] = torch.distributed.get_backend()
    env["world_size"] = torch.distributed.get_world_size()
    for k, v in env.items():
        print(f"  {k}: {v}")
    check("process group backend", env["backend"] == backend, f"{env['backend']} (wanted {backend})")
    if CUDA:  # one collective on the GPU, to see NCCL actually run
        x = torch.ones(4, device="cuda")
        torch.distributed.all_reduce(x)
        check("nccl all_reduce", bool(x.eq(1).all()), "world of 1: all_reduce(ones) == ones")


def join(worker, args, backend: str) -> None:
    worker.join_process_group(master_addr="127.0.0.1", master_port=args.port, rank=0, world_size=1, local_rank=0,
                              backend=backend, timeout_s=600)


def section_policy(label: str, cfg, args, backend: str, ctx: dict) -> None:
    """Build a policy (setup), generate, check log-probs, train. Results under results[label]."""
    from prefopt.cluster.engine_worker import EngineWorker
    from prefopt.workers.policy import PolicyWorker

    s = ctx["sizes"]
    out = results.setdefault(label, {})
    w = PolicyWorker(cfg.model_dump_json())
    join(w, args, backend)
    out["allocated_before_setup_gib"] = allocated_gib()  # what earlier sections left behind
    reset_peak()
    start = time.perf_counter()
    info = w.setup(ctx["model_dir"], ctx["data_path"], ref_cache=OwnReference(w, ctx["data_path"]))
    out["setup_seconds"] = round(time.perf_counter() - start, 1)
    out["engine"] = engine_facts(w, info)
    out["engine"]["setup_peak_gib"] = peak_gib()
    print(f"  setup {out['setup_seconds']}s: {out['engine']}", flush=True)
    prompts = ctx["prompts"]

    with guard(f"{label}: generate"):
        # Warm-up, sampled: generate forks the RNG, so sampling must leave the training RNG as it was.
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state() if CUDA else None
        w.generate(prompts[:4], {"max_new_tokens": 4, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                                 "greedy": False}, 3)
        check(f"{label}: generate leaves the CPU RNG as it was", torch.equal(cpu_rng, torch.get_rng_state()),
              "torch.get_rng_state() before and after a sampled generate")
        if CUDA:
            check(f"{label}: generate leaves the CUDA RNG as it was", torch.equal(cuda_rng, torch.cuda.get_rng_state()),
                  "torch.cuda.get_rng_state() before and after (fork_rng(devices=[]) forks only the CPU RNG, "
                  "while torch.manual_seed inside reseeds CUDA too)")
        samples, out["generate"] = timed_generate(w, prompts, s["gen_tokens"])
        if label == "stage0":
            ctx["greedy_stage0"] = samples
        elif "greedy_stage0" in ctx:
            eq = compare_greedy(ctx["greedy_stage0"], samples)
            out["greedy_vs_stage0"] = eq
            greedy_check(f"{label}: greedy equals stage 0", eq, cfg.model.dtype)

    if w.zero_stage == 3:
        with guard(f"{label}: generate without gather-once"):
            cap = s["gen_tokens_no_gather"]
            _, out["generate_gather_once_capped"] = timed_generate(w, prompts, cap)
            original = EngineWorker._gathered_for_generation
            EngineWorker._gathered_for_generation = lambda self: contextlib.nullcontext()
            try:
                samples, out["generate_no_gather_capped"] = timed_generate(w, prompts, cap)
            finally:
                EngineWorker._gathered_for_generation = original
            once, per = out["generate_gather_once_capped"], out["generate_no_gather_capped"]
            out["gather_once_speedup"] = round(per["seconds"] / once["seconds"], 2)
            print(f"  gather once per call: {out['gather_once_speedup']}x faster at {cap} new tokens", flush=True)
            if "greedy_stage0" in ctx:
                eq = compare_greedy(ctx["greedy_stage0"], samples, cap=cap)
                out["no_gather_greedy_vs_stage0"] = eq
                greedy_check(f"{label}: greedy without gather-once equals stage 0 (first {cap} tokens)", eq,
                             cfg.model.dtype)

    with guard(f"{label}: sampled vs scored log-probs ({cfg.model.dtype})"):
        out["logprob_gap"] = logprob_gap(w, prompts[: s["score_prompts"]], s["score_tokens"])
        if cfg.model.dtype == "float32":
            check(f"{label}: fp32 log-prob gap < 1e-3", out["logprob_gap"]["max_abs_diff"] < 1e-3,
                  f"{out['logprob_gap']['max_abs_diff']:.2e}")

    with guard(f"{label}: train"):
        out["train"] = train(w, s["steps"])
        check_training(label, out["train"])


def section_fp32(cfg, args, backend: str, ctx: dict) -> None:
    """A frozen fp32 stage-0 copy (what a reference is): sampled log-probs vs score."""
    from prefopt.cluster.engine_worker import EngineWorker

    s = ctx["sizes"]
    w = EngineWorker(cfg.model_dump_json(), role="policy")
    join(w, args, backend)
    info = w.build(ctx["model_dir"], train=False)
    out = results.setdefault("fp32", {})
    out["engine"] = engine_facts(w, info)
    out["logprob_gap"] = logprob_gap(w, ctx["prompts"][: s["score_prompts"]], s["score_tokens"])
    check("fp32: log-prob gap < 1e-3", out["logprob_gap"]["max_abs_diff"] < 1e-3,
          f"{out['logprob_gap']['max_abs_diff']:.2e}")


# ----------------------------------------------------------------------------- report


def row(name: str, *values) -> str:
    return f"{name:<36}" + "".join(f"{'' if v is None else v!s:>32}" for v in values)


def summary_table() -> str:
    lines = [row("", "stage0", "zero3_offload", "fp32")]
    get = lambda label, *keys: _dig(results.get(label, {}), keys)  # noqa: E731
    for name, keys in [
        ("dtype", ("dtype",)),
        ("zero stage", ("engine", "zero_stage")),
        ("optimizer", ("engine", "optimizer")),
        ("packing", ("engine", "packing")),
        ("GPU memory before setup (GiB)", ("allocated_before_setup_gib",)),
        ("GPU memory after setup (GiB)", ("engine", "allocated_after_setup_gib")),
        ("setup (s)", ("setup_seconds",)),
        ("train tokens/s", ("train", "tokens_per_s")),
        ("train tokens/step", ("train", "tokens_per_step")),
        ("train s/step", ("train", "step_seconds_mean")),
        ("train peak GPU memory (GiB)", ("train", "peak_gib")),
        ("train first loss (ln 2 = 0.6931)", ("train", "first_loss")),
        ("train last loss", ("train", "last_loss")),
        ("generate new tokens/s", ("generate", "new_tokens_per_s")),
        ("generate prompts x max new tokens", ("generate", "shape")),
        ("generate peak GPU memory (GiB)", ("generate", "peak_gib")),
        ("gather-once tokens/s (capped)", ("generate_gather_once_capped", "new_tokens_per_s")),
        ("no gather-once tokens/s (capped)", ("generate_no_gather_capped", "new_tokens_per_s")),
        ("gather-once speed-up (capped)", ("gather_once_speedup",)),
        ("greedy completions equal to stage 0", ("greedy_vs_stage0", "equal")),
        ("same, without gather-once (capped)", ("no_gather_greedy_vs_stage0", "equal")),
        ("sampled vs score max |diff|", ("logprob_gap", "max_abs_diff")),
    ]:
        values = [get(label, *keys) for label in ("stage0", "zero3_offload", "fp32")]
        if any(v is not None for v in values):
            lines.append(row(name, *[number(v) if isinstance(v, float) else v for v in values]))
    return "\n".join(lines)


def number(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}"


def _dig(d, keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def dump(path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=2, default=str))


# ----------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the CPU test)")
    parser.add_argument("--out", help="write the results as JSON here (rewritten after each section)")
    parser.add_argument("--assets", help="a tiny model dir from `prefopt model build-tiny DIR`, for its tokenizer "
                        "(default: build one first)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16" if CUDA else "float32",
                        help="the policies' dtype (default: bfloat16 on a GPU, float32 on CPU)")
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1) if CUDA else 1,
                        help="policy.cpus_per_worker (the workers set torch's thread count to it)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["stage0", "fp32", "zero3"])
    parser.add_argument("--port", type=int, default=free_port())
    parser.add_argument("--deadline", type=int, default=540,
                        help="seconds: then print every thread's stack and exit (a hang still leaves its JSON and log)")
    args = parser.parse_args()
    faulthandler.dump_traceback_later(args.deadline, exit=True)
    s = SIZES["quick" if args.quick else "full"]
    backend = "nccl" if CUDA else "gloo"
    started = time.perf_counter()
    results["args"] = vars(args) | {"sizes": s}

    with guard("env"):
        section_env(args, backend)
    dump(args.out)

    tmp = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    ctx: dict = {"sizes": s, "model_dir": str(tmp / "model")}
    with guard("model and data"):
        from transformers import AutoTokenizer

        start = time.perf_counter()
        if args.assets:
            assets = Path(args.assets)
        else:
            from prefopt.config import TinyModelConfig
            from prefopt.models import save_tiny

            assets = save_tiny(tmp / "tiny", TinyModelConfig())
        results["model"] = build_model_dir(tmp / "model", assets, s)
        results["model"]["build_seconds"] = round(time.perf_counter() - start, 1)
        tok = AutoTokenizer.from_pretrained(tmp / "model")
        tok_ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id,
                   "first_ordinary": max(tok.all_special_ids) + 1, "vocab_size": len(tok)}
        ctx["data_path"] = write_pairs(tmp / "data", tok_ids, s, num_rows=s["steps"] * s["micro_batch"])
        ctx["prompts"] = random_prompts(tok_ids, s["gen_prompts"], s["gen_prompt_len"], seed=1)
        print(f"  model {results['model']}, data {ctx['data_path']}", flush=True)
    dump(args.out)

    def cfg(dtype: str, zero3: bool):
        return make_config(ctx["model_dir"], str(tmp / "runs"), s, dtype=dtype, zero3_offload=zero3,
                           threads=args.threads)

    if "data_path" in ctx:
        # Stage 0 first: the ZeRO-3 worker's HfDeepSpeedConfig would put every later
        # from_pretrained in this process under zero.Init while it lives.
        if "stage0" not in args.skip:
            with guard("stage0"):
                results["stage0"] = {"dtype": args.dtype}
                section_policy("stage0", cfg(args.dtype, False), args, backend, ctx)
            release()
            dump(args.out)
        if "fp32" not in args.skip:
            with guard("fp32"):
                results["fp32"] = {"dtype": "float32"}
                section_fp32(cfg("float32", False), args, backend, ctx)
            release()
            dump(args.out)
        if "zero3" not in args.skip:
            with guard("zero3_offload"):
                results["zero3_offload"] = {"dtype": args.dtype}
                section_policy("zero3_offload", cfg(args.dtype, True), args, backend, ctx)
            release()
            dump(args.out)

    for label in ("stage0", "zero3_offload"):
        g = _dig(results, (label, "generate"))
        if g:
            g["shape"] = f"{g['prompts']} x {g['max_new_tokens']}"
    shutil.rmtree(tmp, ignore_errors=True)
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    print("\n" + summary_table())
    failed = [k for k, v in results["checks"].items() if not v["ok"]]
    print(f"\nchecks: {len(results['checks']) - len(failed)} of {len(results['checks'])} passed"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    if results["errors"]:
        print(f"sections that raised: {', '.join(results['errors'])}")
    print(f"total {results['total_seconds']}s")
    dump(args.out)
    return 1 if failed or results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

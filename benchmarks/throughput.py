"""DPO training throughput: prefopt vs TRL's DPOTrainer vs a bare PyTorch floor, in one run.

    .venv/bin/python benchmarks/throughput.py            # the numbers in README.md
    .venv/bin/python benchmarks/throughput.py --pairs 16 --batch 4   # a quick look

Same model (a 4-layer, 256-wide Llama built locally), same preference pairs, same number of
CPU threads for everyone. Two data shapes: fixed-length pairs, and ragged pairs whose
prompt and completion lengths vary widely, as in real preference data. The unit is real
(non-padding) tokens per second: prompt + chosen + prompt + rejected tokens, counted once
with the project's tokenizer, divided by the wall time of one epoch of optimizer steps.
Every system runs two epochs and only the second is timed, so that kernel selection,
allocator growth and process start-up are not counted for anyone.

- floor:   plain PyTorch, one padding-free forward + backward + AdamW step per batch on the
           policy only (sequences packed into rows of at most max_length tokens, output layer
           on completion positions only, no reference model, no loss bookkeeping): what the
           hardware gives.
- TRL:     DPOTrainer with a live reference model (its default), and with
           precompute_ref_log_probs=True. Gradient checkpointing off (TRL turns it on by
           default; nobody else recomputes activations).
- prefopt: `prefopt.algorithms.offline.train` on one worker (Ray actor + DeepSpeed),
           reference log-probs precomputed once by the reference server (time reported
           separately: it is paid once and reused), packing on.
- prefopt LoRA: the same with LoRA adapters (model.lora: rank 16, alpha 32, every linear layer
           of the decoder blocks), the cache of the same base model reused.

Memory, fp32, after one step: the bytes each rank holds under ZeRO-3 with 1 and 2 ranks, full and
LoRA: parameters, the part of them that trains, and the optimizer's state (Adam's two moments and
the fp32 copy ZeRO steps), as the rank reports them (EngineWorker.memory).

Precision: every row states it, and every system in a row group runs in it.
- fp32 (always): weights, activations, gradients and optimizer in fp32. TRL's DPOConfig turns
  bf16 on by default (bf16=None becomes True unless fp16 is set), which on CPU means
  torch.autocast("cpu", bfloat16) around every forward; here bf16 and fp16 are set off
  explicitly, the model is loaded with dtype=float32, and the run fails if TRL's accelerator
  still reports mixed precision.
- bf16 weights (only where the CPU has bf16 units: avx512_bf16 / amx_bf16 on x86, bf16 on
  Arm): every system loads its model with dtype=bfloat16, so forward and backward compute in
  bf16 and no autocast is used anywhere (TRL with bf16=False: its default bf16=True would add
  autocast on top). The optimizers differ and are part of what is measured: floor and TRL run
  torch AdamW directly on the bf16 parameters; prefopt (model.dtype=bfloat16, DeepSpeed
  bf16) keeps an fp32 master copy and fp32 AdamW states and copies back to bf16 each step.
Every system's parameters are checked to be in the row's dtype before its timed epoch (for
prefopt, from the parameter bytes its rank reports at setup); a mismatch is an error.

The results start with the CPU model, core and thread counts and the library versions; the
JSON printed at the end (and written with --json) holds the same. The bf16 rows run every
system a second time (the fp32 rows alone took about 9 minutes on 2 cores); --no-bf16 skips
them, --skip-trl / --skip-prefopt leave a system out.

Ratios are what to read: they are measured in one run on one machine, against the floor in
the same precision.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from prefopt.config import TinyModelConfig, load_config  # noqa: E402
from prefopt.models import save_tiny  # noqa: E402
from prefopt.tasks.imdb import load_reviews  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    # (prompt tokens lo, hi), (completion tokens lo, hi): sampled log-uniformly when lo != hi
    "fixed": ((48, 48), (96, 96)),
    "ragged": ((4, 160), (8, 320)),
}
# precision name -> (torch dtype of every system's parameters, prefopt's model.dtype, label in the table)
PRECISIONS = {
    "fp32": (torch.float32, "float32", "fp32"),
    "bf16": (torch.bfloat16, "bfloat16", "bf16 weights"),
}
HOW_BF16 = (
    "bf16 weights: floor and TRL load the model with dtype=bfloat16 and run torch AdamW on the bf16 "
    "parameters (TRL with bf16=False: no autocast; its reference model follows the policy's dtype); "
    "prefopt loads it with model.dtype=bfloat16 and DeepSpeed's bf16 mode keeps fp32 master weights and "
    "fp32 AdamW states. No system uses autocast."
)


# ----------------------------------------------------------------------------- environment


def _cpuinfo() -> list[dict[str, str]]:
    """/proc/cpuinfo as one dict per logical CPU ([] where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    cpus = []
    for block in text.strip().split("\n\n"):
        fields = {}
        for line in block.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        cpus.append(fields)
    return cpus


def bf16_units() -> tuple[bool, str]:
    """(has bf16 units, why we think so). The CPU flags decide: oneDNN's own check
    (torch.ops.mkldnn._is_mkldnn_bf16_supported) is true on any AVX-512 CPU because oneDNN
    can emulate bf16 there, slowly, so it cannot tell."""
    cpus = _cpuinfo()
    if cpus:
        flags = set((cpus[0].get("flags") or cpus[0].get("Features") or "").split())  # x86 / Arm
        found = sorted(flags & {"avx512_bf16", "amx_bf16", "bf16"})
        if found:
            return True, "CPU flags " + ", ".join(found)
        return False, "no avx512_bf16, amx_bf16 or bf16 flag in /proc/cpuinfo: bf16 would be emulated"
    # No /proc/cpuinfo: ask torch's cpuinfo (private helpers, hence the getattr).
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return True, "torch.cpu reports avx512_bf16"
    return False, "no /proc/cpuinfo, and torch.cpu does not report avx512_bf16"


def environment(threads: int) -> dict:
    """What the numbers were measured on: printed above the results and kept in the JSON."""
    cpus = _cpuinfo()
    model = cpus[0].get("model name") if cpus else None
    physical = {(c.get("physical id"), c.get("core id")) for c in cpus if "core id" in c}

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    has_bf16, why = bf16_units()
    return {
        "cpu": model or platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": len(physical) or None,
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": torch.get_num_threads(),
        "threads_requested": threads,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # "highest" = fp32 matmuls really in fp32 (no TF32 / bf16 shortcuts).
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "bf16_units": has_bf16,
        "bf16_units_why": why,
        "python": platform.python_version(),
        **{name: version(name) for name in ("torch", "transformers", "trl", "deepspeed", "accelerate", "ray")},
    }


def require_dtype(system: str, named_params, dtype: torch.dtype) -> None:
    """Fail unless every parameter is in the row's dtype: a system silently running in another
    precision (TRL's bf16 default did) makes its row meaningless."""
    found = {p.dtype for _, p in named_params}
    if found != {dtype}:
        message = f"{system}: parameters are {sorted(str(d) for d in found)}, the row says {dtype}"
        print(f"WARNING: precision mismatch: {message}", file=sys.stderr)
        raise RuntimeError(message)


def log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    if lo == hi:
        return lo
    return int(round(lo * (hi / lo) ** rng.random()))


def make_pairs(tokenizer, shape: str, n: int, seed: int = 0) -> list[dict]:
    """Pairs cut from IMDb reviews at exact token counts (decoded back to text)."""
    (p_lo, p_hi), (c_lo, c_hi) = SHAPES[shape]
    reviews = [tokenizer(r, add_special_tokens=False).input_ids for r in load_reviews(limit=4000)]
    long_enough = [r for r in reviews if len(r) >= p_hi + 2 * c_hi]
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        ids = rng.choice(long_enough)
        p, c1, c2 = log_uniform(rng, p_lo, p_hi), log_uniform(rng, c_lo, c_hi), log_uniform(rng, c_lo, c_hi)
        pairs.append({"prompt": tokenizer.decode(ids[:p]),
                      "chosen": tokenizer.decode(ids[p : p + c1]),
                      "rejected": tokenizer.decode(ids[p + c1 : p + c1 + c2])})
    return pairs


def real_tokens(tokenizer, pairs: list[dict]) -> int:
    n = 0
    for pair in pairs:
        prompt = len(tokenizer(pair["prompt"]).input_ids)  # with BOS
        for key in ("chosen", "rejected"):
            n += prompt + len(tokenizer(pair[key], add_special_tokens=False).input_ids) + 1  # + EOS
    return n


# ----------------------------------------------------------------------------- floor


def bench_floor(model_dir: Path, tokenizer, pairs: list[dict], batch: int, lr: float, max_length: int,
                dtype: torch.dtype) -> float:
    """Seconds for one epoch of padding-free forward+backward+AdamW over the pairs: sequences
    packed into rows of at most max_length tokens (no padding waste, no cross-sequence
    attention cost), the output layer and a plain next-token cross-entropy on completion
    positions only, nothing else. Weights (and so AdamW) in `dtype`."""
    from transformers import AutoModelForCausalLM

    from prefopt.data.collate import pack

    # dtype given explicitly: since transformers 5 from_pretrained otherwise follows the config.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    batches = []
    for s in range(0, len(pairs), batch):
        prompts, completions = [], []
        for pair in pairs[s : s + batch]:
            for key in ("chosen", "rejected"):
                prompts.append(tokenizer(pair["prompt"]).input_ids)
                completions.append(tokenizer(pair[key], add_special_tokens=False).input_ids + [tokenizer.eos_token_id])
        batches.append(pack(prompts, completions, row_tokens=max_length, pad_token_id=tokenizer.pad_token_id))
    for _epoch in range(2):  # the first epoch warms up kernels and allocators; the second is timed
        require_dtype("floor", model.named_parameters(), dtype)
        start = time.perf_counter()
        for b in batches:
            hidden = model.model(input_ids=b["input_ids"], position_ids=b["position_ids"]).last_hidden_state
            logits = model.lm_head(hidden[b["loss_mask"]])  # output layer on completion positions only
            loss = torch.nn.functional.cross_entropy(logits, b["labels"][b["loss_mask"]])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- TRL


def bench_trl(model_dir: Path, tokenizer, pairs: list[dict], batch: int, lr: float, precompute: bool,
              max_length: int, workdir: Path, dtype: torch.dtype) -> tuple[float, float]:
    """(train seconds, precompute seconds) for one epoch of TRL's DPOTrainer, weights in `dtype`."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    class Clock(TrainerCallback):
        """Times each epoch (the second is reported) and checks the precision before each."""

        def __init__(self):
            self.starts: list[float] = []
            self.ends: list[float] = []
            self.trainer = None  # set once the trainer exists

        def on_epoch_begin(self, args, state, control, model=None, **kw):
            # Mixed precision would mean autocast around the forward, whatever the weights are.
            accelerator = self.trainer.accelerator
            if accelerator.mixed_precision != "no" or accelerator.native_amp:
                message = f"TRL: accelerator mixed_precision={accelerator.mixed_precision!r}, expected 'no'"
                print(f"WARNING: precision mismatch: {message}", file=sys.stderr)
                raise RuntimeError(message)
            require_dtype("TRL policy", model.named_parameters(), dtype)
            if model.is_activation_checkpointing:
                raise RuntimeError("TRL: activation checkpointing is on; no other system recomputes activations")
            if self.trainer.ref_model is not None:  # live reference, built by TRL
                require_dtype("TRL reference", self.trainer.ref_model.named_parameters(), dtype)
            self.starts.append(time.perf_counter())

        def on_epoch_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

    args = DPOConfig(
        output_dir=str(workdir / f"trl-{precompute}"), per_device_train_batch_size=batch, learning_rate=lr,
        num_train_epochs=2, max_length=max_length, precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=batch, use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=10**6, dataloader_num_workers=0, padding_free=False, disable_tqdm=True, seed=0,
        lr_scheduler_type="constant", warmup_steps=0,
        # TRL's defaults differ from transformers' here: bf16=None means True (autocast to bf16
        # on CPU), and gradient_checkpointing=True (transformers 5.23 reads it as
        # activation_checkpointing, the new name set here). Precision is set by the weights'
        # dtype instead, and no other system recomputes activations. tf32 only exists on CUDA.
        bf16=False, fp16=False, tf32=False, activation_checkpointing=False,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    clock = Clock()
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs),
                         processing_class=tokenizer, callbacks=[clock])
    clock.trainer = trainer
    trainer.remove_callback(PrinterCallback)  # its end-of-training dict would land amid our output
    train_start = time.perf_counter()
    trainer.train()
    # With precompute, TRL computes the reference log-probs inside train(), before epoch 1;
    # the precompute time is what passes before the first epoch begins (approximately).
    precompute_seconds = max(0.0, clock.starts[0] - train_start) if precompute else 0.0
    return clock.ends[-1] - clock.starts[-1], precompute_seconds


# ----------------------------------------------------------------------------- prefopt


def bench_prefopt(model_dir: Path, pairs: list[dict], batch: int, lr: float, max_length: int,
                  threads: int, workdir: Path, shape: str, precision: str = "fp32", ref_mode: str = "cache",
                  workers: int = 1, steps: int | None = None, num_params: int | None = None, lora: bool = False):
    """-> (train seconds, reference seconds, each rank's memory) for one epoch of prefopt.
    With num_params, checks that rank 0 holds its parameters in the precision's dtype."""
    from prefopt.algorithms.offline import train

    dtype, model_dtype, _ = PRECISIONS[precision]
    data_file = workdir / f"{shape}.jsonl"
    data_file.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    out = workdir / f"prefopt-{shape}-{precision}-{ref_mode}-{workers}{'-lora' if lora else ''}"
    cfg = load_config(ROOT / "configs/tiny/dpo.yaml", [
        f"model.path={model_dir}", f"model.dtype={model_dtype}", f"data.path={data_file}", "data.task=null",
        f"output_dir={out}", f"data.max_length={max_length}", f"data.max_prompt_length={max_length - 16}",
        f"policy.micro_batch_size={batch // workers}", f"train.max_steps={steps or 2 * (len(pairs) // batch)}",
        # One call per epoch: logging points cut the policy's calls, so the second epoch is timed alone.
        f"train.lr={lr}", f"train.save_steps={10**6}", f"train.log_steps={len(pairs) // batch}",
        f"policy.cpus_per_worker={threads}",
        f"policy.num_workers={workers}", "data.packing=true", f"ref.mode={ref_mode}",
        f"ref.cache_dir={workdir / 'refcache'}",
        *(["model.lora.rank=16", "model.lora.alpha=32"] if lora else []),
    ])
    result = train(cfg, Console(file=io.StringIO()), resume=False)
    if num_params is not None:
        # The worker runs in a Ray actor, out of reach; the bytes it reports at setup tell the
        # dtype (DeepSpeed keeps the module's parameters in that dtype for the whole run).
        bytes_per_param = (result.param_bytes[0] - result.memory[0]["trainable_param_bytes"] * lora) / (
            num_params / workers)  # the base model's parameters: LoRA's adapters come on top
        itemsize = torch.empty((), dtype=dtype).element_size()
        if abs(bytes_per_param - itemsize) > 0.5:  # ZeRO partitions may pad a little
            message = f"prefopt: {bytes_per_param:.2f} bytes per parameter on rank 0, {dtype} has {itemsize}"
            print(f"WARNING: precision mismatch: {message}", file=sys.stderr)
            raise RuntimeError(message)
    steps_logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Two epochs were run; the second is timed (the first warms up the worker process).
    timed = steps_logged[len(steps_logged) // 2 :] if steps is None else steps_logged
    train_seconds = sum(m["tokens"] / m["tokens_per_second"] for m in timed)
    return train_seconds, result.timings.get("reference_seconds", 0.0), result.memory


# ----------------------------------------------------------------------------- main

# Short labels: the table must fit 80 columns (rich's width when the output is not a terminal).
SYSTEMS = [("PyTorch floor", "floor"), ("TRL live ref", "trl_live"), ("TRL precomputed ref", "trl_cached"),
           ("prefopt live ref", "prefopt_live"), ("prefopt ref cache", "prefopt"),
           ("prefopt LoRA, ref cache", "prefopt_lora")]
NAN = float("nan")


def print_environment(console: Console, env: dict) -> None:
    console.print(f"CPU: {env['cpu']}; {env['logical_cpus']} logical CPUs ({env['physical_cores']} physical cores), "
                  f"{env['cpus_usable']} usable by this process; {env['threads']} torch threads "
                  f"(ATen {env['torch_cpu_capability']}, fp32 matmul precision {env['float32_matmul_precision']})")
    console.print("versions: " + ", ".join(f"{name} {env[name]}" for name in
                                           ("python", "torch", "transformers", "trl", "deepspeed", "accelerate", "ray")))


def results_table(results: dict[str, dict[str, dict]], title: str) -> Table:
    """One row per (system, precision), one group per precision; ratios against that group's floor."""
    table = Table(title=title)
    table.add_column("system", no_wrap=True)
    table.add_column("precision", no_wrap=True)
    shapes = list(next(iter(results.values())))
    for shape in shapes:
        table.add_column(f"{shape} tok/s", justify="right")
        table.add_column("/ floor", justify="right")
    for precision, by_shape in results.items():
        for label, key in SYSTEMS:
            if not any(key in r for r in by_shape.values()):
                continue  # left out with --skip-trl / --skip-prefopt
            cells = []
            for r in by_shape.values():
                value = r.get(key, NAN)
                cells += [f"{value:.0f}", f"{value / r['floor']:.2f}"]
            table.add_row(label, PRECISIONS[precision][2], *cells)
        table.add_section()
    return table


def memory_table(memory: dict[str, list[dict[str, int]]]) -> Table:
    table = Table(title="MiB per rank under ZeRO-3, fp32, after one DPO step (rank 0; EngineWorker.memory)")
    for column in ("run", "parameters", "trained", "optimizer state", "/ full optimizer state"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for run, ranks in memory.items():
        full = memory[run.replace("LoRA", "full")][0]["optimizer_state_bytes"]
        m = ranks[0]
        table.add_row(run, *(f"{m[k] / 2**20:.3f}" for k in ("param_bytes", "trainable_param_bytes",
                                                               "optimizer_state_bytes")),
                      f"{m['optimizer_state_bytes'] / full:.3f}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--shapes", default="fixed,ragged")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--skip-prefopt", action="store_true", help="also skips the ZeRO-3 memory check")
    parser.add_argument("--no-bf16", action="store_true", help="fp32 rows only, even on a CPU with bf16 units")
    parser.add_argument("--json", type=Path, help="also write the JSON results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    env = environment(args.threads)
    precisions = ["fp32"]
    if not env["bf16_units"]:
        bf16_line = f"bf16 rows skipped: this CPU has no bf16 units ({env['bf16_units_why']})"
    elif args.no_bf16:
        bf16_line = f"bf16 rows skipped: --no-bf16 (the CPU has bf16 units: {env['bf16_units_why']})"
    else:
        precisions.append("bf16")
        bf16_line = f"bf16 rows run: the CPU has bf16 units ({env['bf16_units_why']})"
    console.print(bf16_line)
    if not args.skip_prefopt:
        # prefopt's runs need a local Ray instance, whose daemons (raylet, GCS, dashboard) share
        # the CPU with whatever runs. Start it first, so every system is measured with them up:
        # on 2 cores they cost an in-process training loop about 10% (benchmarks/profile_step.py
        # run with and without Ray up), which would otherwise be charged to prefopt alone.
        from prefopt.cluster.ray_setup import connect
        from prefopt.config import ClusterConfig, RoleConfig

        connect(ClusterConfig(), [RoleConfig(num_workers=2, cpus_per_worker=args.threads), RoleConfig()])
        console.print("Ray: a local instance is up for every system's measurement")
    lr = 1e-5
    workdir = Path(tempfile.mkdtemp(prefix="prefopt-bench-"))
    tiny = TinyModelConfig(vocab_size=2048, hidden_size=args.width, intermediate_size=args.width * 3,
                           num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                           max_position_embeddings=1024)
    with console.status("building the benchmark model"):
        model_dir = save_tiny(workdir / "model", tiny)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    num_params = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).num_parameters()
    data = {}  # shape -> (pairs, max_length, real tokens): the same for every precision
    for shape in args.shapes.split(","):
        pairs = make_pairs(tokenizer, shape, args.pairs)
        data[shape] = pairs, SHAPES[shape][0][1] + SHAPES[shape][1][1] + 8, real_tokens(tokenizer, pairs)

    results: dict[str, dict[str, dict]] = {}  # precision -> shape -> row
    for precision in precisions:
        dtype = PRECISIONS[precision][0]
        results[precision] = {}
        for shape, (pairs, max_length, tokens) in data.items():
            row = {"tokens": tokens}
            with console.status(f"{precision} {shape}: bare PyTorch floor"):
                row["floor"] = tokens / bench_floor(model_dir, tokenizer, pairs, args.batch, lr, max_length, dtype)
            if not args.skip_trl:
                with console.status(f"{precision} {shape}: TRL, live reference"):
                    row["trl_live"] = tokens / bench_trl(model_dir, tokenizer, pairs, args.batch, lr, False,
                                                         max_length, workdir, dtype)[0]
                with console.status(f"{precision} {shape}: TRL, precomputed reference"):
                    seconds, row["trl_precompute_s"] = bench_trl(model_dir, tokenizer, pairs, args.batch, lr, True,
                                                                 max_length, workdir, dtype)
                    row["trl_cached"] = tokens / seconds
            if not args.skip_prefopt:
                with console.status(f"{precision} {shape}: prefopt, one worker, reference cache"):
                    seconds, row["prefopt_precompute_s"], _ = bench_prefopt(
                        model_dir, pairs, args.batch, lr, max_length, args.threads, workdir, shape, precision,
                        num_params=num_params)
                    row["prefopt"] = tokens / seconds
                with console.status(f"{precision} {shape}: prefopt, one worker, live reference server"):
                    seconds, _, _ = bench_prefopt(model_dir, pairs, args.batch, lr, max_length, args.threads,
                                                  workdir, shape, precision, ref_mode="live", num_params=num_params)
                    row["prefopt_live"] = tokens / seconds
                with console.status(f"{precision} {shape}: prefopt LoRA, one worker, reference cache"):
                    seconds, _, _ = bench_prefopt(model_dir, pairs, args.batch, lr, max_length, args.threads,
                                                  workdir, shape, precision, num_params=num_params, lora=True)
                    row["prefopt_lora"] = tokens / seconds
            results[precision][shape] = row

    # ZeRO-3 memory, fp32: what each rank holds with 1 and with 2 ranks, full and LoRA (1 step suffices).
    zero3, memory = {}, {}
    if not args.skip_prefopt:
        with console.status("bytes per rank under ZeRO-3, 1 and 2 ranks, full and LoRA"):
            pairs = make_pairs(tokenizer, "fixed", 8)
            for workers in (1, 2):
                for lora in (False, True):
                    _, _, memory[f"{workers} rank(s), {'LoRA' if lora else 'full'}"] = bench_prefopt(
                        model_dir, pairs, 4, lr, 160, 1, workdir, "zero3", workers=workers, steps=1, lora=lora)
                zero3[workers] = [m["param_bytes"] for m in memory[f"{workers} rank(s), full"]]

    console.print()
    print_environment(console, env)
    console.print(bf16_line)
    title = (f"DPO throughput, real tokens/s ({args.layers}x{args.width} Llama, {args.pairs} pairs, batch "
             f"{args.batch}, {env['threads']} threads); / floor: against the floor in the same precision")
    table = results_table(results, title)
    console.print(table)
    if "bf16" in results:
        console.print(HOW_BF16)
    for precision, by_shape in results.items():
        for shape, r in by_shape.items():
            if "prefopt" in r and "trl_live" in r:
                console.print(
                    f"{precision} {shape}: prefopt (cache) / TRL live = {r['prefopt'] / r['trl_live']:.2f}, "
                    f"/ TRL precomputed = {r['prefopt'] / r['trl_cached']:.2f}; prefopt cache / live = "
                    f"{r['prefopt'] / r['prefopt_live']:.2f}; one-time reference precompute: prefopt "
                    f"{r['prefopt_precompute_s']:.1f} s (incl. actor start), TRL {r['trl_precompute_s']:.1f} s")
    if "bf16" in results:
        for shape in data:
            fp32, bf16 = results["fp32"][shape], results["bf16"][shape]
            console.print(f"{shape}: bf16 / fp32 tok/s: " + ", ".join(
                f"{label} {bf16[key] / fp32[key]:.2f}" for label, key in SYSTEMS if key in fp32))
    if zero3:
        whole = zero3[1][0]
        console.print(f"ZeRO-3 parameter bytes per rank (fp32): 1 rank {whole / 2**20:.2f} MiB; 2 ranks "
                      + ", ".join(f"{b / 2**20:.2f} MiB ({b / whole:.2f})" for b in zero3[2]))
        console.print(memory_table(memory))
    for precision, by_shape in results.items():
        for shape, r in by_shape.items():
            if "prefopt_lora" in r:
                console.print(f"{precision} {shape}: prefopt LoRA / full (both with the cache) = "
                              f"{r['prefopt_lora'] / r['prefopt']:.2f}")
    report = {
        "environment": env,
        "precisions": {p: {"dtype": str(PRECISIONS[p][0]), "label": PRECISIONS[p][2]} for p in results},
        "bf16": bf16_line,
        "how_bf16": HOW_BF16 if "bf16" in results else None,
        "results": results,
        "zero3_param_bytes": zero3,
        "memory_per_rank": memory,
        "argv": sys.argv[1:],
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

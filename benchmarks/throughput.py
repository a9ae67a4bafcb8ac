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
           precompute_ref_log_probs=True.
- prefopt: `prefopt.algorithms.offline.train` on one worker (Ray actor + DeepSpeed ZeRO-3),
           reference log-probs precomputed once by the reference server (time reported
           separately: it is paid once and reused), packing on.

Ratios are what to read: they are measured in one run on one machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tempfile
import time
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


def bench_floor(model_dir: Path, tokenizer, pairs: list[dict], batch: int, lr: float, max_length: int) -> float:
    """Seconds for one epoch of padding-free forward+backward+AdamW over the pairs: sequences
    packed into rows of at most max_length tokens (no padding waste, no cross-sequence
    attention cost), the output layer and a plain next-token cross-entropy on completion
    positions only, nothing else."""
    from transformers import AutoModelForCausalLM

    from prefopt.data.collate import pack

    model = AutoModelForCausalLM.from_pretrained(model_dir)
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
              max_length: int, workdir: Path) -> tuple[float, float]:
    """(train seconds, precompute seconds) for one epoch of TRL's DPOTrainer."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    first_epoch_start: list[float] = []

    class Clock(TrainerCallback):  # times the second epoch: the first warms up
        start = end = 0.0

        def on_epoch_begin(self, args, state, control, **kw):
            Clock.start = time.perf_counter()
            first_epoch_start.append(Clock.start)

        def on_epoch_end(self, args, state, control, **kw):
            Clock.end = time.perf_counter()

    args = DPOConfig(
        output_dir=str(workdir / f"trl-{precompute}"), per_device_train_batch_size=batch, learning_rate=lr,
        num_train_epochs=2, max_length=max_length, precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=batch, use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=10**6, dataloader_num_workers=0, padding_free=False, disable_tqdm=True, seed=0,
        lr_scheduler_type="constant", warmup_steps=0,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs),
                         processing_class=tokenizer, callbacks=[Clock()])
    precompute_start = time.perf_counter()
    trainer.train()
    # With precompute, TRL computes the reference log-probs inside train(), before epoch 1;
    # the precompute time is what passes before the first epoch begins (approximately).
    return Clock.end - Clock.start, 0.0 if not precompute else max(0.0, first_epoch_start[0] - precompute_start)


# ----------------------------------------------------------------------------- prefopt


def bench_prefopt(model_dir: Path, pairs: list[dict], batch: int, lr: float, max_length: int,
                  threads: int, workdir: Path, shape: str, ref_mode: str = "cache", workers: int = 1,
                  steps: int | None = None):
    """-> (train seconds, reference seconds, parameter bytes per rank) for one epoch of prefopt."""
    from prefopt.algorithms.offline import train

    data_file = workdir / f"{shape}.jsonl"
    data_file.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    out = workdir / f"prefopt-{shape}-{ref_mode}-{workers}"
    cfg = load_config(ROOT / "configs/tiny/dpo.yaml", [
        f"model.path={model_dir}", f"data.path={data_file}", "data.task=null", f"output_dir={out}",
        f"data.max_length={max_length}", f"data.max_prompt_length={max_length - 16}",
        f"train.micro_batch_size={batch // workers}", f"train.max_steps={steps or 2 * (len(pairs) // batch)}",
        f"train.lr={lr}", f"train.save_steps={10**6}", f"cluster.cpus_per_worker={threads}",
        f"cluster.num_workers={workers}", "data.packing=true", f"ref.mode={ref_mode}",
        f"ref.cache_dir={workdir / 'refcache'}",
    ])
    result = train(cfg, Console(file=io.StringIO()), resume=False)
    steps_logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Two epochs were run; the second is timed (the first warms up the worker process).
    timed = steps_logged[len(steps_logged) // 2 :] if steps is None else steps_logged
    train_seconds = sum(m["tokens"] / m["tokens_per_second"] for m in timed)
    return train_seconds, result.timings.get("reference_seconds", 0.0), result.param_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--shapes", default="fixed,ragged")
    parser.add_argument("--skip-trl", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    lr = 1e-5
    workdir = Path(tempfile.mkdtemp(prefix="prefopt-bench-"))
    tiny = TinyModelConfig(vocab_size=2048, hidden_size=args.width, intermediate_size=args.width * 3,
                           num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                           max_position_embeddings=1024)
    with console.status("building the benchmark model"):
        model_dir = save_tiny(workdir / "model", tiny)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    results = {}
    for shape in args.shapes.split(","):
        pairs = make_pairs(tokenizer, shape, args.pairs)
        max_length = SHAPES[shape][0][1] + SHAPES[shape][1][1] + 8
        tokens = real_tokens(tokenizer, pairs)
        row = {"tokens": tokens}
        with console.status(f"{shape}: bare PyTorch floor"):
            row["floor"] = tokens / bench_floor(model_dir, tokenizer, pairs, args.batch, lr, max_length)
        if not args.skip_trl:
            with console.status(f"{shape}: TRL, live reference"):
                row["trl_live"] = tokens / bench_trl(model_dir, tokenizer, pairs, args.batch, lr, False,
                                                     max_length, workdir)[0]
            with console.status(f"{shape}: TRL, precomputed reference"):
                seconds, row["trl_precompute_s"] = bench_trl(model_dir, tokenizer, pairs, args.batch, lr, True,
                                                             max_length, workdir)
                row["trl_cached"] = tokens / seconds
        with console.status(f"{shape}: prefopt, one worker, reference cache"):
            seconds, row["prefopt_precompute_s"], _ = bench_prefopt(model_dir, pairs, args.batch, lr, max_length,
                                                                    args.threads, workdir, shape)
            row["prefopt"] = tokens / seconds
        with console.status(f"{shape}: prefopt, one worker, live reference server"):
            seconds, _, _ = bench_prefopt(model_dir, pairs, args.batch, lr, max_length, args.threads, workdir,
                                          shape, ref_mode="live")
            row["prefopt_live"] = tokens / seconds
        results[shape] = row

    # ZeRO-3 memory: parameter bytes each rank holds with 1 and with 2 ranks (2 steps suffice).
    zero3 = {}
    with console.status("parameter bytes per rank under ZeRO-3, 1 and 2 ranks"):
        pairs = make_pairs(tokenizer, "fixed", 8)
        for workers in (1, 2):
            _, _, zero3[workers] = bench_prefopt(model_dir, pairs, 4, lr, 160, 1, workdir, "zero3",
                                                 workers=workers, steps=1)

    table = Table(title=f"DPO throughput, real tokens/s ({args.layers}x{args.width} Llama, {args.pairs} pairs, "
                        f"batch {args.batch}, {args.threads} threads)")
    table.add_column("system")
    for shape in results:
        table.add_column(f"{shape} tok/s", justify="right")
        table.add_column(f"{shape} / floor", justify="right")
    systems = [("bare PyTorch floor", "floor"), ("TRL, live reference", "trl_live"),
               ("TRL, precomputed reference", "trl_cached"), ("prefopt, live reference server", "prefopt_live"),
               ("prefopt, reference cache", "prefopt")]
    for label, key in systems:
        cells = []
        for r in results.values():
            value = r.get(key, float("nan"))
            cells += [f"{value:.0f}", f"{value / r['floor']:.2f}"]
        table.add_row(label, *cells)
    console.print(table)
    for shape, r in results.items():
        trl_live, trl_cached = r.get("trl_live", float("nan")), r.get("trl_cached", float("nan"))
        console.print(f"{shape}: prefopt (cache) / TRL live = {r['prefopt'] / trl_live:.2f}, "
                      f"/ TRL precomputed = {r['prefopt'] / trl_cached:.2f}; prefopt cache / live = "
                      f"{r['prefopt'] / r['prefopt_live']:.2f}; one-time reference precompute: prefopt "
                      f"{r['prefopt_precompute_s']:.1f} s (incl. actor start), TRL {r.get('trl_precompute_s', 0):.1f} s")
    whole = zero3[1][0]
    console.print(f"ZeRO-3 parameter bytes per rank: 1 rank {zero3[1][0] / 2**20:.2f} MiB; 2 ranks "
                  + ", ".join(f"{b / 2**20:.2f} MiB ({b / whole:.2f})" for b in zero3[2]))
    print(json.dumps({"results": results, "zero3_param_bytes": zero3, "argv": sys.argv[1:]}, indent=1))


if __name__ == "__main__":
    main()

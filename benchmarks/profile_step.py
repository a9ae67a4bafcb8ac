"""Where one prefopt DPO step goes: rows + collate, forward + log-probs, loss, backward, optimizer
step. One rank, in-process (no Ray), the throughput benchmark's model and fixed-length pairs,
the same calls as PolicyWorker.train_step; the first epoch warms up, the second is timed.
Then the benchmark's floor on the same pairs in the same process, and the ratio of the two.

    .venv/bin/python benchmarks/profile_step.py [--shape fixed|ragged] [--no-clip]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import deepspeed  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from throughput import ROOT, SHAPES, bench_floor, make_pairs  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from prefopt.cluster.deepspeed_config import deepspeed_config  # noqa: E402
from prefopt.cluster.worker_group import free_port  # noqa: E402
from prefopt.config import TinyModelConfig, load_config  # noqa: E402
from prefopt.data import collate, prepare  # noqa: E402
from prefopt.losses import pairwise_loss  # noqa: E402
from prefopt.models import save_tiny  # noqa: E402
from prefopt.models.logprobs import sequence_logps  # noqa: E402
from prefopt.workers.offline_step import MIN_PACKING_GAIN  # noqa: E402

PAIRS, BATCH = 64, 8


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="fixed", choices=["fixed", "ragged"])
    parser.add_argument("--no-clip", action="store_true", help="gradient_clipping 0 (the floor does not clip)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    max_length = SHAPES[args.shape][0][1] + SHAPES[args.shape][1][1] + 8  # as throughput.py
    workdir = Path(tempfile.mkdtemp(prefix="prefopt-profile-"))
    tiny = TinyModelConfig(vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
    model_dir = save_tiny(workdir / "model", tiny)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data_file = workdir / "pairs.jsonl"
    data_file.write_text("".join(json.dumps(p) + "\n" for p in make_pairs(tokenizer, args.shape, PAIRS)))
    cfg = load_config(ROOT / "configs/tiny/dpo.yaml", [
        f"model.path={model_dir}", f"data.path={data_file}", "data.task=null", f"output_dir={workdir}/run",
        f"data.max_length={max_length}", f"data.max_prompt_length={max_length - 16}",
        f"policy.micro_batch_size={BATCH}", "train.lr=1e-5",
        f"policy.deepspeed.gradient_clipping={0.0 if args.no_clip else 1.0}",
    ])
    data = prepare(cfg, tokenizer, workdir / "data")

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed("gloo", auto_mpi_discovery=False, verbose=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                    config=deepspeed_config(cfg.policy, dtype=cfg.model.dtype, world_size=1,
                                                            train=cfg.train))
    # The reference is the starting policy, as in a real run: the DPO margin starts at 0. (A made-up
    # constant reference saturates the sigmoid, and the tiny gradients that follow are denormal
    # floats, which CPUs compute many times slower: it once made this profile 4x too slow.)
    ref = {"chosen": np.zeros(data.num_rows, np.float32), "rejected": np.zeros(data.num_rows, np.float32)}
    with torch.no_grad():
        for step in range(PAIRS // BATCH):
            indices = list(range(step * BATCH, (step + 1) * BATCH))
            batch = collate(data.rows(indices), pad_token_id=data.pad_token_id, packing=True,
                            max_length=data.max_length, min_packing_gain=MIN_PACKING_GAIN)
            logps, _ = sequence_logps(engine, batch)
            ref["chosen"][indices], ref["rejected"][indices] = logps[:BATCH].numpy(), logps[BATCH:].numpy()

    phases = ("rows + collate", "forward + log-probs", "loss", "backward", "optimizer step")
    for _epoch in range(2):  # the first warms up, the second is reported
        spent = dict.fromkeys(phases, 0.0)
        start = time.perf_counter()
        for step in range(PAIRS // BATCH):
            indices = list(range(step * BATCH, (step + 1) * BATCH))
            marks = [time.perf_counter()]
            batch = collate(data.rows(indices), pad_token_id=data.pad_token_id, packing=True,
                            max_length=data.max_length, min_packing_gain=MIN_PACKING_GAIN)
            marks.append(time.perf_counter())
            logps, _ = sequence_logps(engine, batch)
            marks.append(time.perf_counter())
            out = pairwise_loss("dpo", policy_chosen_logps=logps[:BATCH], policy_rejected_logps=logps[BATCH:],
                                ref_chosen_logps=torch.from_numpy(ref["chosen"][indices]),
                                ref_rejected_logps=torch.from_numpy(ref["rejected"][indices]), beta=0.1)
            marks.append(time.perf_counter())
            engine.backward(out.loss)
            marks.append(time.perf_counter())
            engine.step()
            marks.append(time.perf_counter())
            for phase, a, b in zip(phases, marks, marks[1:], strict=False):
                spent[phase] += b - a
        total = time.perf_counter() - start
    print("seconds per step:", round(total / (PAIRS // BATCH), 4))
    for phase in phases:
        print(f"  {phase:<20} {spent[phase] / total:6.1%}")
    pairs = [json.loads(line) for line in data_file.read_text().splitlines()]
    floor = bench_floor(model_dir, tokenizer, pairs, BATCH, cfg.train.lr, max_length, torch.float32)
    print(f"floor seconds per step: {floor / (PAIRS // BATCH):.4f}; prefopt step / floor step: {total / floor:.3f}")


if __name__ == "__main__":
    main()

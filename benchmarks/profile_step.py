"""Where one prefopt DPO step goes: rows + collate, forward + log-probs, loss, backward, optimizer
step. One rank, in-process (no Ray), the throughput benchmark's model and fixed-length pairs,
the same calls as PolicyWorker.train_step; the first epoch warms up, the second is timed.

    .venv/bin/python benchmarks/profile_step.py
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
from throughput import ROOT, make_pairs  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from prefopt.cluster.deepspeed_config import deepspeed_config  # noqa: E402
from prefopt.cluster.worker_group import free_port  # noqa: E402
from prefopt.config import TinyModelConfig, load_config  # noqa: E402
from prefopt.data import collate, prepare  # noqa: E402
from prefopt.losses import pairwise_loss  # noqa: E402
from prefopt.models import save_tiny  # noqa: E402
from prefopt.models.logprobs import sequence_logps  # noqa: E402
from prefopt.workers.offline_step import MIN_PACKING_GAIN  # noqa: E402

PAIRS, BATCH, MAX_LENGTH = 64, 8, 152


def main() -> None:
    torch.set_num_threads(2)
    workdir = Path(tempfile.mkdtemp(prefix="prefopt-profile-"))
    tiny = TinyModelConfig(vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
    model_dir = save_tiny(workdir / "model", tiny)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data_file = workdir / "pairs.jsonl"
    data_file.write_text("".join(json.dumps(p) + "\n" for p in make_pairs(tokenizer, "fixed", PAIRS)))
    cfg = load_config(ROOT / "configs/tiny/dpo.yaml", [
        f"model.path={model_dir}", f"data.path={data_file}", "data.task=null", f"output_dir={workdir}/run",
        f"data.max_length={MAX_LENGTH}", f"data.max_prompt_length={MAX_LENGTH - 16}",
        f"policy.micro_batch_size={BATCH}", "train.lr=1e-5",
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
    ref = np.full(data.num_rows, -200.0, dtype=np.float32)  # values do not change the cost

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
                                ref_chosen_logps=torch.from_numpy(ref[indices]),
                                ref_rejected_logps=torch.from_numpy(ref[indices]), beta=0.1)
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


if __name__ == "__main__":
    main()

"""The reference server and the reusable reference log-prob cache, end to end."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from prefopt.algorithms.offline import train
from prefopt.algorithms.precompute_ref import cache_parts, cache_root, open_cache, precompute
from prefopt.config import load_config
from prefopt.data import prepare
from prefopt.refcache import RefCache, RefCacheMismatch

ROOT = Path(__file__).resolve().parents[2]
TINY_DPO = ROOT / "configs/tiny/dpo.yaml"


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def config(tmp_path, model_dir, *overrides):
    return load_config(TINY_DPO, [f"model.path={model_dir}", "data.num_examples=40", f"output_dir={tmp_path}/run",
                                  "train.save_steps=1000", "eval.num_prompts=4", "eval.sampling.max_new_tokens=4",
                                  *overrides])


def prepared(cfg, tokenizer):
    return prepare(cfg, tokenizer, Path(cfg.output_dir) / "data")


def test_cached_logps_equal_a_plain_transformers_forward(tmp_path, tiny_model_dir, tiny_tokenizer, ray_local):
    cfg = config(tmp_path, tiny_model_dir)
    data = prepared(cfg, tiny_tokenizer)
    cached = precompute(cfg, tiny_model_dir, tiny_tokenizer, data, quiet()).read()

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for row in data.rows(range(data.num_rows)):
        for role in ("chosen", "rejected"):
            ids = torch.tensor([row["prompt_ids"] + row[f"{role}_ids"]])
            with torch.no_grad():
                logits = model(ids).logits[0].double()  # (T, V), one sequence alone: no padding at all
            logps = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0]  # token t+1 given <= t
            expected = logps[len(row["prompt_ids"]) - 1 :].sum().item()  # completion tokens only
            assert cached[role][row["index"]] == pytest.approx(expected, abs=1e-5 * max(1.0, abs(expected)))


def test_training_from_the_cache_matches_live_reference(tmp_path, tiny_model_dir, ray_local):
    curves = {}
    for mode in ("cache", "live"):
        cfg = config(tmp_path / mode, tiny_model_dir, f"ref.mode={mode}", "train.max_steps=4")
        train(cfg, quiet())
        curves[mode] = [json.loads(line)["loss"] for line in Path(cfg.output_dir, "metrics.jsonl").open()]
    assert curves["cache"][-1] != curves["cache"][0]
    assert curves["live"] == pytest.approx(curves["cache"], abs=1e-5)


def test_each_input_change_is_a_miss_and_a_foreign_cache_is_refused(tmp_path, tiny_model_dir, tiny_tokenizer,
                                                                    ray_local):
    from prefopt.config import TinyModelConfig
    from prefopt.models import save_tiny

    base = config(tmp_path, tiny_model_dir)
    first = precompute(base, tiny_model_dir, tiny_tokenizer, prepared(base, tiny_tokenizer), quiet())
    # Another seed gives other weights but the same tokenizer: only reference_weights differs.
    other_model = save_tiny(tmp_path / "other-model", TinyModelConfig(seed=1))
    variants = {
        "data": (config(tmp_path, tiny_model_dir, "data.num_examples=32"), tiny_model_dir),
        "reference_weights": (base, other_model),
        "max_length": (config(tmp_path, tiny_model_dir, "data.max_length=90"), tiny_model_dir),
    }
    for part, (cfg, model_dir) in variants.items():
        data = prepared(cfg, tiny_tokenizer)
        nearest = RefCache.nearest(cache_root(cfg), cache_parts(cfg, model_dir, tiny_tokenizer, data))
        assert nearest is not None and part in nearest[1], part  # max_length also changes the data part
        cache = open_cache(cfg, model_dir, tiny_tokenizer, data)
        assert cache.uri != first.uri and cache.missing_shards() == cache.shards(), part
        assert cache.parts[part] != first.parts[part]
    # Pointing ref.cache_dir at the first cache while training on other data is refused, naming "data".
    other = config(tmp_path, tiny_model_dir, "data.num_examples=32", f"ref.cache_dir={first.uri}")
    with pytest.raises(RefCacheMismatch, match=r"data differs"):
        open_cache(other, tiny_model_dir, tiny_tokenizer, prepared(other, tiny_tokenizer))
    # The same inputs find the first cache complete: nothing is recomputed.
    again = open_cache(base, tiny_model_dir, tiny_tokenizer, prepared(base, tiny_tokenizer))
    assert again.uri == first.uri and again.is_complete()


def test_killed_precompute_resumes_to_the_same_cache(tmp_path, tiny_model_dir, tiny_tokenizer, ray_local):
    overrides = ["data.num_examples=400", "policy.micro_batch_size=2"]
    straight_cfg = config(tmp_path / "straight", tiny_model_dir, *overrides)
    straight = precompute(straight_cfg, tiny_model_dir, tiny_tokenizer, prepared(straight_cfg, tiny_tokenizer),
                          quiet()).read()

    killed_dir = tmp_path / "killed"
    args = [sys.executable, "-m", "prefopt", "precompute-ref", str(TINY_DPO), "--set", f"model.path={tiny_model_dir}",
            "--set", f"output_dir={killed_dir}/run"] + [a for o in overrides for a in ("--set", o)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=os.environ | {"DS_ACCELERATOR": "cpu"})
    deadline = time.time() + 300
    while not list(killed_dir.glob("refcache/*/shard-*.parquet")) and time.time() < deadline:
        assert proc.poll() is None, "precompute ended before writing a shard"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_cfg = config(tmp_path / "killed", tiny_model_dir, *overrides)
    data = prepared(killed_cfg, tiny_tokenizer)
    partial = open_cache(killed_cfg, tiny_model_dir, tiny_tokenizer, data)
    left = partial.missing_shards()
    assert 0 < len(left) < len(partial.shards()), "the kill came too late to leave shards missing"
    resumed = precompute(killed_cfg, tiny_model_dir, tiny_tokenizer, data, quiet()).read()
    for role in ("chosen", "rejected"):
        np.testing.assert_array_equal(resumed[role], straight[role])


def test_offloaded_reference_gives_the_same_cache(tmp_path, tiny_model_dir, tiny_tokenizer, ray_local):
    """ref.offload serves the reference with DeepSpeed ZeRO-3 inference (parameters in CPU memory);
    the log-probs must not change."""
    plain_cfg = config(tmp_path / "plain", tiny_model_dir)
    plain = precompute(plain_cfg, tiny_model_dir, tiny_tokenizer, prepared(plain_cfg, tiny_tokenizer), quiet()).read()
    offload_cfg = config(tmp_path / "offload", tiny_model_dir, "ref.deepspeed.zero_stage=3", "ref.deepspeed.offload_param=true")
    offloaded = precompute(offload_cfg, tiny_model_dir, tiny_tokenizer, prepared(offload_cfg, tiny_tokenizer),
                           quiet()).read()
    for role in ("chosen", "rejected"):
        np.testing.assert_allclose(offloaded[role], plain[role], rtol=1e-5, atol=1e-4)

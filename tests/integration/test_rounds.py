"""ReST and iterative DPO end to end on 2 ZeRO-3 CPU ranks: the policy samples and trains on the
same ranks, and a run killed with SIGKILL inside a Grow step or between steps resumes to the
uninterrupted run's final metrics, without sampling a written shard again."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from prefopt.algorithms.rounds import train
from prefopt.config import load_config

ROOT = Path(__file__).resolve().parents[2]
REST = ROOT / "configs/tiny/rest.yaml"
ITERATIVE = ROOT / "configs/tiny/iterative_dpo.yaml"

SMALL = ["policy.num_workers=2", "data.num_examples=96", "train.save_steps=1", "train.log_steps=1",
         "eval.num_prompts=8", "eval.samples_per_prompt=1", "eval.sampling.max_new_tokens=8"]
REST_SETS = [*SMALL, "rest.thresholds=[0.3,0.6]", "rest.improve_steps=3", "rest.grow.num_prompts=48",
             "rest.grow.samples_per_prompt=4", "rest.grow.prompts_per_shard=2", "rest.grow.sampling.max_new_tokens=12",
             "rest.lr_decay=0.5"]
ITERATIVE_SETS = [*SMALL, "iterative.rounds=2", "iterative.round_steps=3", "iterative.grow.num_prompts=48",
                  "iterative.grow.samples_per_prompt=4", "iterative.grow.prompts_per_shard=2",
                  "iterative.grow.sampling.max_new_tokens=12", "train.lr=2e-3"]


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def read_metrics(output_dir) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def shard_bytes(samples: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(samples.glob("shard-*.parquet"))}


def start(config: Path, out: Path, sets: list[str]) -> subprocess.Popen:
    args = [sys.executable, "-m", "prefopt", "train", str(config), *(a for s in sets for a in ("--set", s)),
            "--set", f"output_dir={out}"]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=os.environ | {"DS_ACCELERATOR": "cpu"})


def kill_when(proc: subprocess.Popen, ready, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its local Ray and its workers
    proc.wait()


def test_rest_on_two_zero3_ranks_resumes_after_kills_inside_grow_and_between_steps(tmp_path, tiny_model_dir,
                                                                                      ray_local):
    sets = [f"model.path={tiny_model_dir}", *REST_SETS]
    straight = train(load_config(REST, [*sets, f"output_dir={tmp_path / 'straight'}"]), quiet())
    steps = read_metrics(tmp_path / "straight")
    assert [m["step"] for m in steps] == list(range(1, 7))
    # The second Improve step trains at half the rate (rest.lr_decay 0.5), on fewer, better samples.
    assert steps[3]["lr"] == pytest.approx(steps[0]["lr"] / 2)
    assert straight.param_bytes[0] < 0.6 * sum(straight.param_bytes)  # ZeRO-3: each rank holds a part

    out = tmp_path / "killed"
    samples = out / "rounds/grow-0/samples"
    # Killed inside the Grow step: some shards written, not all (24 of them).
    kill_when(start(REST, out, sets), lambda: len(shard_bytes(samples)) >= 2, "two grown shards")
    before = shard_bytes(samples)
    assert 2 <= len(before) < 24, len(before)
    assert not read_metrics(out)
    # Started again: only the missing shards are sampled; killed again between steps of Improve 2.
    kill_when(start(REST, out, sets), lambda: len(read_metrics(out)) >= 5, "five steps")
    after = shard_bytes(samples)
    assert len(after) == 24
    assert {name: after[name] for name in before} == before  # never sampled twice
    assert list(out.glob("checkpoints/step*/trainer_state.json"))

    resumed = train(load_config(REST, [*sets, f"output_dir={out}"]), quiet())
    assert [m["step"] for m in read_metrics(out)][-6:] == list(range(1, 7))
    for key in ("loss", "eval/reward", "eval/kl"):
        assert resumed.final_metrics[key] == pytest.approx(straight.final_metrics[key], abs=1e-5), key

    # Tracking: the data kept at each threshold, and an evaluation after each Improve step.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    kept = client.get_metric_history(resumed.run_id, "rest/kept")
    assert sorted(m.step for m in kept) == [0, 3]  # once each, though the run was started three times
    kept = {m.step: m.value for m in kept}
    threshold = {m.step: m.value for m in client.get_metric_history(resumed.run_id, "rest/threshold")}
    assert 0 < kept[3] <= kept[0] and threshold[3] >= threshold[0]  # the stricter filter keeps no more
    assert sorted(m.step for m in client.get_metric_history(resumed.run_id, "eval/reward")) == [0, 3, 6]
    assert client.get_run(resumed.run_id).data.tags["algorithm"] == "rest"


def test_iterative_dpo_on_two_zero3_ranks_resumes_inside_the_second_grow(tmp_path, tiny_model_dir, ray_local):
    sets = [f"model.path={tiny_model_dir}", *ITERATIVE_SETS]
    straight = train(load_config(ITERATIVE, [*sets, f"output_dir={tmp_path / 'straight'}"]), quiet())
    steps = read_metrics(tmp_path / "straight")
    assert [m["step"] for m in steps] == list(range(1, 7))
    # Each round's reference is the policy as the round began: its first loss is ln 2 again.
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert steps[3]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert steps[2]["loss"] < 0.69

    out = tmp_path / "killed"
    samples = out / "rounds/grow-1/samples"
    # Killed after round 1's checkpoint, inside round 2's Grow step.
    kill_when(start(ITERATIVE, out, sets), lambda: len(shard_bytes(samples)) >= 2, "round 2's first shards")
    before = shard_bytes(samples)
    assert len(before) < 24
    resumed = train(load_config(ITERATIVE, [*sets, f"output_dir={out}"]), quiet())
    assert {name: shard_bytes(samples)[name] for name in before} == before
    assert [m["step"] for m in read_metrics(out)] == list(range(1, 7))
    for key in ("loss", "eval/reward", "eval/kl"):
        assert resumed.final_metrics[key] == pytest.approx(straight.final_metrics[key], abs=1e-5), key


def test_rest_improve_from_grow_starts_each_improve_step_again_from_the_grow_policy(tmp_path, tiny_model_dir,
                                                                                     ray_local):
    sets = [f"model.path={tiny_model_dir}", *REST_SETS, "policy.num_workers=1", "rest.lr_decay=1.0", "train.lr=2e-3"]
    losses = {}
    for start_from in ("previous", "grow"):
        out = tmp_path / start_from
        train(load_config(REST, [*sets, f"rest.improve_from={start_from}", f"output_dir={out}"]), quiet())
        losses[start_from] = [m["loss"] for m in read_metrics(out)]
    # The same run up to the end of Improve 1, then Improve 2 from the Grow's policy: it has not
    # learnt the kept samples yet, so its first loss on them is higher than the trained policy's.
    assert losses["grow"][:3] == pytest.approx(losses["previous"][:3], abs=1e-6)
    assert losses["grow"][3] > losses["previous"][3] + 1e-3, losses


def test_iterative_dpo_with_lora_takes_each_round_start_as_its_reference(tmp_path, tiny_model_dir, ray_local):
    """With LoRA the round's reference is the adapted policy as the round began (the adapters on,
    saved and reloaded from an adapter-only checkpoint), not the base model: ln 2 again at round 2."""
    sets = [f"model.path={tiny_model_dir}", *ITERATIVE_SETS, "model.lora.rank=8", "train.lr=5e-3",
            f"output_dir={tmp_path / 'run'}"]
    result = train(load_config(ITERATIVE, sets), quiet())
    steps = read_metrics(tmp_path / "run")
    assert [m["step"] for m in steps] == list(range(1, 7))
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-4)
    assert steps[3]["loss"] == pytest.approx(0.6931, abs=1e-4)
    assert steps[2]["loss"] < 0.69
    assert Path(result.model_dir).name == "adapter"

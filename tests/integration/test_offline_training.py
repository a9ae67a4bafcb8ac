"""The offline trainer end to end: Ray actors, DeepSpeed ZeRO-3 on CPU ranks (gloo), real data."""

import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from prefopt.algorithms.offline import train
from prefopt.config import load_config

ROOT = Path(__file__).resolve().parents[2]
TINY_DPO = ROOT / "configs/tiny/dpo.yaml"


def read_metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


@pytest.fixture(scope="module")
def synthetic_pairs(tmp_path_factory):
    """A learnable preference set: chosen completions praise, rejected ones pan."""
    rng = random.Random(0)
    subjects = ["The film", "This movie", "The plot", "The cast", "The ending", "The score", "It", "The story"]
    good = ["was wonderful and moving.", "is a joy, truly great.", "was brilliant, loved it.", "is superb."]
    bad = ["was awful and boring.", "is a mess, truly bad.", "was terrible, hated it.", "is dreadful."]
    path = tmp_path_factory.mktemp("synthetic") / "pairs.jsonl"
    with path.open("w") as f:
        for _ in range(96):
            prompt = rng.choice(subjects)
            f.write(json.dumps({"prompt": prompt, "chosen": " " + rng.choice(good),
                                "rejected": " " + rng.choice(bad)}) + "\n")
    return path


def tiny_run(tmp_path, model_dir, data_path, *overrides):
    return load_config(TINY_DPO, [f"model.path={model_dir}", f"data.path={data_path}", "data.task=null",
                                  f"output_dir={tmp_path}", "train.save_steps=1000", *overrides])


def test_cli_trains_with_zero3_on_two_ranks_evaluates_along_the_way_and_exports(tmp_path, tiny_model_dir):
    import csv

    out = tmp_path / "run"
    sets = ["policy.num_workers=2", "train.max_steps=3", f"output_dir={out}", f"model.path={tiny_model_dir}",
            "eval.every_steps=1", "eval.num_prompts=8", "eval.sampling.max_new_tokens=8", "train.lr=2e-3"]
    proc = subprocess.run(
        [sys.executable, "-m", "prefopt", "train", str(TINY_DPO), *(a for s in sets for a in ("--set", s))],
        capture_output=True, text=True, timeout=600, env=os.environ | {"DS_ACCELERATOR": "cpu"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    # Policy starts at the reference: the first DPO loss is ln 2 (Δ = 0: docs/losses.md, "Invariant").
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert metrics[-1]["loss"] != pytest.approx(math.log(2), abs=1e-6)  # and it trained
    assert "2 rank(s), ZeRO stage 3" in proc.stdout

    # One (KL, reward) point at step 0 and after every step: the run is a curve on the plane.
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])[0]
    kl = sorted(client.get_metric_history(run.info.run_id, "eval/kl"), key=lambda m: m.step)
    assert [m.step for m in kl] == [0, 1, 2, 3]
    assert kl[0].value == pytest.approx(0.0, abs=1e-4)  # the policy is the reference at step 0
    assert kl[-1].value != pytest.approx(0.0, abs=1e-4)
    assert len(client.get_metric_history(run.info.run_id, "eval/reward")) == 4
    compare = subprocess.run([sys.executable, "-m", "prefopt", "compare", "--experiment", "tiny",
                              "--tracking-uri", uri, "--out", str(tmp_path / "compare")],
                             capture_output=True, text=True, timeout=300)
    assert compare.returncode == 0, compare.stdout[-3000:] + compare.stderr[-3000:]
    with open(tmp_path / "compare" / "comparison.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["num_evals"] == "4"
    assert (tmp_path / "compare" / "frontier.png").read_bytes().startswith(b"\x89PNG")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    generated = model.generate(**tok("This movie was", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > len(tok("This movie was").input_ids)


def test_reward_accuracy_exceeds_090_on_learnable_pairs(tmp_path, tiny_model_dir, synthetic_pairs, ray_local):
    cfg = tiny_run(tmp_path, tiny_model_dir, synthetic_pairs, "train.max_steps=40", "policy.micro_batch_size=8",
                   "train.lr=1e-3")
    result = train(cfg, quiet())
    metrics = read_metrics(tmp_path)
    late = [m["rewards/accuracies"] for m in metrics[-5:]]
    assert sum(late) / len(late) > 0.9, late
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.1
    assert Path(result.model_dir).is_dir()


def test_two_ranks_equal_one_rank_with_twice_the_micro_batch(tmp_path, tiny_model_dir, synthetic_pairs, ray_local):
    """Loss scaling across ranks and accumulation steps: the same global batch, the same curve."""
    curves, param_bytes = {}, {}
    layouts = {
        "2x2": ["policy.num_workers=2", "policy.micro_batch_size=2"],
        "1x4": ["policy.num_workers=1", "policy.micro_batch_size=4"],
        "1x2x2acc": ["policy.num_workers=1", "policy.micro_batch_size=2", "train.gradient_accumulation_steps=2"],
    }
    for name, overrides in layouts.items():
        cfg = tiny_run(tmp_path / name, tiny_model_dir, synthetic_pairs, "train.max_steps=5",
                       "data.packing=false", *overrides)
        param_bytes[name] = train(cfg, quiet()).param_bytes
        curves[name] = [m["loss"] for m in read_metrics(tmp_path / name)]
    assert curves["1x4"][-1] < curves["1x4"][0]  # the curve moves, so equality means something
    for name in ("2x2", "1x2x2acc"):
        assert curves[name] == pytest.approx(curves["1x4"], abs=1e-4), name
    # ZeRO-3: with two ranks each holds about half of the parameters, never the whole model.
    whole = param_bytes["1x4"][0]
    assert len(param_bytes["2x2"]) == 2
    assert all(0.45 * whole < held < 0.55 * whole for held in param_bytes["2x2"]), (param_bytes, whole)


def test_killed_run_resumes_to_the_same_final_loss(tmp_path, tiny_model_dir, synthetic_pairs, ray_local):
    steps = "train.max_steps=24"
    reference_cfg = tiny_run(tmp_path / "straight", tiny_model_dir, synthetic_pairs, steps)
    train(reference_cfg, quiet())
    straight = read_metrics(tmp_path / "straight")

    out = tmp_path / "killed"
    args = [sys.executable, "-m", "prefopt", "train", str(TINY_DPO), "--set", steps, "--set", "train.save_steps=4",
            "--set", "train.log_steps=1",
            "--set", f"output_dir={out}", "--set", f"model.path={tiny_model_dir}",
            "--set", f"data.path={synthetic_pairs}", "--set", "data.task=null"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=os.environ | {"DS_ACCELERATOR": "cpu"})
    deadline = time.time() + 300
    # Killed a few steps after its first checkpoint: those steps were logged and run again.
    while (not list(out.glob("checkpoints/step*/trainer_state.json")) or not (out / "metrics.jsonl").is_file()
           or len(read_metrics(out)) < 6) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its local Ray and its workers
    proc.wait()
    killed_at = len(read_metrics(out))
    assert killed_at < 24, "the run finished before it could be killed"

    resumed_cfg = tiny_run(out, tiny_model_dir, synthetic_pairs, steps, "train.save_steps=4", "train.log_steps=1")
    result = train(resumed_cfg, quiet())
    resumed = read_metrics(out)
    assert [m["step"] for m in resumed] == list(range(1, 25))
    assert resumed[-1]["loss"] == pytest.approx(straight[-1]["loss"], abs=1e-5)
    # The same MLflow run, with exactly one point per step (the replayed steps are not logged twice).
    from mlflow import MlflowClient

    history = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(result.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 25))

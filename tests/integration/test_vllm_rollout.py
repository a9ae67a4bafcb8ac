"""rollout.engine: vllm on CPU: vLLM engines in their own environment (make vllm-env), the
policy's weights pushed into them from two ZeRO-3 ranks after every update, the push checked,
PPO on the engines' samples, and a killed engine ending the run in one line and a fresh one
taking over on resume."""

import contextlib
import io
import json
import os
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from prefopt.algorithms.ppo import train
from prefopt.cluster.worker_group import ClusterError
from prefopt.config import TinyModelConfig, load_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
GREEDY = {"max_new_tokens": 12, "greedy": True}
# PPO, critic-free (RLOO), two policy ranks: with the reference and one engine, the tests' local Ray is full.
FAST = ["ppo.rollout_prompts=4", "ppo.samples_per_prompt=2", "ppo.advantage=rloo", "policy.num_workers=2",
        "policy.micro_batch_size=4", "ppo.sampling.max_new_tokens=12", "eval.num_prompts=8",
        "eval.sampling.max_new_tokens=8", "eval.every_steps=null", "train.save_steps=2", "train.lr=1e-3",
        "rollout.engine=vllm", "rollout.check_greedy=true", "rollout.timeout_s=60"]


@pytest.fixture(scope="module")
def vllm_env():
    """The vLLM environment `make test` builds first (make vllm-env); elsewhere its tests are skipped."""
    from prefopt.rollout.sampler import REPO_VENV

    python = Path(os.environ.get("PREFOPT_VLLM_PYTHON") or REPO_VENV)
    if not python.exists():
        if os.environ.get("PREFOPT_REQUIRE_VLLM"):
            pytest.fail(f"{python} is missing: `make test` builds it with `make vllm-env`")
        pytest.skip("no vLLM environment: run `make vllm-env`")
    return python


@pytest.fixture(scope="module")
def model32(tmp_path_factory):
    """The tiny Llama with heads of 32 dimensions (vLLM's CPU attention takes no fewer)."""
    from prefopt.models import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny32"), TinyModelConfig(num_attention_heads=2, num_key_value_heads=1))


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def read_metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def ppo_config(out, model_dir, *overrides):
    return load_config(ROOT / "configs/tiny/ppo_vllm.yaml", [f"model.path={model_dir}", f"output_dir={out}", *FAST,
                                                        *overrides])


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_engine_greedy_samples_equal_the_policy_after_every_update_on_two_zero3_ranks(
        tmp_path, model32, vllm_env, ray_local, lora):
    """With LoRA the engine gets the merged weights, W + scaling * B @ A, under the base's names."""
    from transformers import AutoTokenizer

    from prefopt.cluster.worker_group import WorkerGroup
    from prefopt.rollout.sampler import VLLMSampler
    from prefopt.workers.ppo import PPOPolicyWorker

    cfg = ppo_config(tmp_path, model32, *(["model.lora.rank=4", "train.lr=2e-2"] if lora else []))
    tokenizer = AutoTokenizer.from_pretrained(model32)
    prompts = [tokenizer(p).input_ids for p in ["The movie was", "I did not", "What a", "This is the"] * 2]
    policy = WorkerGroup(PPOPolicyWorker, cfg.policy, cfg.cluster, name="policy", key="policy",
                         init_args=(cfg.model_dump_json(),))
    sampler = None
    try:
        assert policy.call("setup", str(model32), schedule={"max_steps": 12})[0]["zero_stage"] == 3
        sampler = VLLMSampler(cfg, policy, str(model32), tokenizer, prompts[:4], quiet())
        plan = [list(range(8))] * 2  # two optimizer steps on the 8 samples (4 per rank)
        first = None
        for update in range(1, 4):
            samples = policy.split("generate", prompts, {"max_new_tokens": 6}, update)
            first = first or samples
            experience = {"prompt_ids": prompts, "completion_ids": [s["completion_ids"] for s in samples],
                          "old_logps": [s["logprobs"] for s in samples],
                          "advantages": [[1.0 if i % 2 else -1.0] * len(s["completion_ids"]) for i, s in enumerate(samples)]}
            policy.call("update", experience, plan)
            if update == 1:
                # Not synced yet: the check sees an engine serving the weights before the update.
                with pytest.raises(ClusterError, match=r"^rollout: after the weight sync .* differ from the policy's"):
                    sampler.check()
            sampler.updated(update)
            theirs = sampler.split("generate", prompts, GREEDY, 0)  # syncs first, then checks
            ours = policy.split("generate", prompts, GREEDY, 0)
            assert [s["completion_ids"] for s in theirs] == [s["completion_ids"] for s in ours], update
            metrics = sampler.metrics()
            assert metrics["rollout/sync_greedy_match"] == 1.0
            assert metrics["rollout/sync_max_abs_diff"] < 1e-4
            assert metrics["rollout/logprob_diff_max"] < 1e-4  # the engine's log-probs are the policy's, fp32
            assert metrics["rollout/sync_mb"] > 0
            for s, o in zip(theirs, ours, strict=True):  # the samples carry the policy's own log-probs
                assert s["logprobs"] == pytest.approx(o["logprobs"], abs=1e-5)
        # The updates moved the policy, so equal samples above mean the engine took every sync.
        now = policy.split("score", [{"prompt_ids": p, "completion_ids": s["completion_ids"]}
                                     for p, s in zip(prompts, first, strict=True)])
        moved = max(abs(a - b) for new, old in zip(now, first, strict=True)
                    for a, b in zip(new, old["logprobs"], strict=True))
        assert moved > 1e-2
    finally:
        if sampler is not None:
            sampler.shutdown()
        policy.shutdown()


def test_ppo_samples_through_vllm_with_every_sync_checked(tmp_path, model32, vllm_env, ray_local):
    result = train(ppo_config(tmp_path, model32, "train.max_steps=4"), quiet())
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for m in metrics:  # each iteration sampled from an engine synced to the weights of the update before it
        assert m["rollout/sync_max_abs_diff"] < 1e-4 and m["rollout/sync_greedy_match"] == 1.0, m["step"]
        assert m["rollout/logprob_diff"] < 1e-4
    assert abs(metrics[-1]["ppo/kl"]) > 1e-4  # the policy left its reference
    final = result.final_metrics
    assert {"eval/reward", "eval/kl", "eval/win_rate"} <= set(final)
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path.parent}/mlflow.db")
    assert [m.step for m in client.get_metric_history(result.run_id, "rollout/sync_max_abs_diff")] == [0, 1, 2, 3, 4]


def test_a_killed_engine_ends_the_run_in_one_line_and_resume_starts_a_fresh_one(tmp_path, model32, vllm_env,
                                                                                 ray_local):
    import ray

    cfg = ppo_config(tmp_path, model32, "train.max_steps=6", "rollout.check_greedy=false")
    straight = train(ppo_config(tmp_path / "straight", model32, "train.max_steps=6", "rollout.check_greedy=false"),
                     quiet()).final_metrics
    killed: dict = {}

    def kill_after_step_3():
        log = tmp_path / "metrics.jsonl"
        while not log.exists() or len(read_metrics(tmp_path)) < 3:
            time.sleep(0.1)
        (name,) = [a for a in ray.util.list_named_actors() if a.startswith("rollout-engine")]
        ray.kill(ray.get_actor(name))
        killed["at"] = time.monotonic()

    killer = threading.Thread(target=kill_after_step_3, daemon=True)
    killer.start()
    with pytest.raises(ClusterError) as err:
        train(cfg, quiet())
    ended = time.monotonic()
    killer.join(timeout=5)
    message = str(err.value)
    assert message.startswith("rollout: a vLLM engine died during") and "resume the run" in message
    assert "\n" not in message
    assert ended - killed["at"] < cfg.rollout.timeout_s
    assert 3 <= len(read_metrics(tmp_path)) < 6

    resumed = train(cfg, quiet()).final_metrics  # from the last checkpoint; a new engine takes its weights
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics][-3:] == [4, 5, 6]
    # vLLM draws each prompt from its own seed: the resumed run samples what the unbroken one did.
    for key in ("ppo/reward", "ppo/kl", "ppo/policy_loss", "eval/reward", "eval/kl"):
        assert resumed[key] == pytest.approx(straight[key], abs=1e-5), key
    assert all(m["rollout/sync_max_abs_diff"] < 1e-4 for m in metrics[-3:])
    assert not [a for a in ray.util.list_named_actors() if a.startswith("rollout-engine")]  # shut down with the run


def test_generate_through_vllm_writes_the_greedy_samples_hf_writes(tmp_path, model32, vllm_env, ray_local):
    """`prefopt generate` with rollout.engine: vllm: the same shards' rows as the policy's own ranks
    give greedily (texts, token counts, the policy's log-probs), and a manifest that keeps the two apart."""
    import pyarrow.parquet as pq

    from prefopt.algorithms import generate

    tables, manifests = {}, {}
    for engine in ("hf", "vllm"):
        cfg = load_config(ROOT / "configs/tiny/onpolicy.yaml", [
            f"model.path={model32}", f"output_dir={tmp_path / engine}", "data.num_examples=6",
            "generate.prompts_per_shard=3", "generate.num_samples=2", "generate.sampling.max_new_tokens=12",
            "generate.sampling.greedy=true", f"rollout.engine={engine}"])
        out = Path(generate.run(cfg, quiet()))
        tables[engine] = [pq.read_table(p).to_pylist() for p in sorted(out.glob("shard-*.parquet"))]
        manifests[engine] = json.loads((out / "manifest.json").read_text())
    assert len(tables["vllm"]) == 2
    for hf_shard, vllm_shard in zip(tables["hf"], tables["vllm"], strict=True):
        for a, b in zip(hf_shard, vllm_shard, strict=True):
            assert (a["completion"], a["completion_tokens"], a["finished"]) == (b["completion"], b["completion_tokens"],
                                                                              b["finished"])
            assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)
    assert manifests["vllm"]["engine"] == "vllm" and "engine" not in manifests["hf"]
    assert manifests["vllm"]["fingerprint"] != manifests["hf"]["fingerprint"]


def test_a_stuck_engine_ends_the_run_in_one_line_within_its_timeout(tmp_path, model32, vllm_env, ray_local):
    """An engine that stops answering (its process stopped, as a hung NCCL call or a swapped-out
    host would leave it) ends the run after rollout.timeout_s, never a hang."""
    import signal

    from ray.util.state import list_actors

    cfg = ppo_config(tmp_path, model32, "train.max_steps=6", "rollout.check_greedy=false", "rollout.timeout_s=10")
    stopped: dict = {}

    def stop_after_step_2():
        log = tmp_path / "metrics.jsonl"
        while not log.exists() or len(read_metrics(tmp_path)) < 2:
            time.sleep(0.1)
        (engine,) = list_actors(filters=[("class_name", "=", "VLLMEngine"), ("state", "=", "ALIVE")])
        os.kill(engine.pid, signal.SIGSTOP)
        stopped.update(at=time.monotonic(), pid=engine.pid)

    stopper = threading.Thread(target=stop_after_step_2, daemon=True)
    stopper.start()
    try:
        with pytest.raises(ClusterError) as err:
            train(cfg, quiet())
        ended = time.monotonic()
    finally:
        stopper.join(timeout=5)
        if "pid" in stopped:  # killed with the run already, but never leave a process stopped
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped["pid"], signal.SIGCONT)
    message = str(err.value)
    assert message.startswith("rollout: the ") and "did not finish within rollout.timeout_s=10s" in message
    assert "\n" not in message
    # The sync or generate waiting on it gave up within its 10 s (plus the step it was in).
    assert ended - stopped["at"] < 10 + 20


def test_a_sweep_runs_each_trials_engine_in_the_trials_reservation(tmp_path, model32, vllm_env):
    """`prefopt sweep` over two seeds of PPO through vLLM, as a user runs it (its own process, its
    own local Ray): each trial's engine takes the bundle its trial reserved, and is checked."""
    import subprocess
    import sys

    from mlflow import MlflowClient

    sets = [f"model.path={model32}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "train.max_steps=2",
            *(s for s in FAST if not s.startswith("policy.num_workers")), "policy.num_workers=1"]
    args = [sys.executable, "-m", "prefopt", "sweep", str(ROOT / "configs/tiny/ppo_vllm.yaml"), "--grid",
            "train.lr=1e-3", "--seeds", "2", "--output-dir", str(tmp_path / "sweep"),
            *(a for s in sets for a in ("--set", s))]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env=os.environ | {"DS_ACCELERATOR": "cpu", "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    trials = [r for r in runs if "prefopt.sweep.trial" in r.data.tags]
    assert len(trials) == 2
    for r in trials:
        assert r.info.status == "FINISHED"
        checks = client.get_metric_history(r.info.run_id, "rollout/sync_max_abs_diff")
        assert [m.step for m in checks] == [0, 1, 2] and all(m.value < 1e-4 for m in checks)

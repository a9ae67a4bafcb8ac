"""PPO end to end on the engine workers: PPO-GT learns the built-in task, the update is the same on
two ranks as on one with twice the micro-batch, a killed run resumes exactly, the critic-free
estimators and a trained reward model run on the same loop."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from prefopt.algorithms.ppo import train
from prefopt.config import load_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TINY_PPO = ROOT / "configs/tiny/ppo.yaml"
FAST = ["train.max_steps=4", "ppo.rollout_prompts=8", "policy.micro_batch_size=4", "ppo.sampling.max_new_tokens=12",
        "eval.num_prompts=8", "eval.sampling.max_new_tokens=8", "eval.every_steps=null", "train.save_steps=2"]


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def read_metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def ppo_config(out, model_dir, *overrides):
    return load_config(TINY_PPO, [f"model.path={model_dir}", f"output_dir={out}", *overrides])


@pytest.fixture(scope="module")
def sft_model_dir(tmp_path_factory, tiny_model_dir, ray_local):
    """The SFT reference of the DPO paper's protocol (as `prefopt demo` makes it)."""
    from prefopt.algorithms.offline import train as train_offline

    out = tmp_path_factory.mktemp("sft")
    cfg = load_config(ROOT / "configs/tiny/sft.yaml", [
        f"model.path={tiny_model_dir}", f"output_dir={out}", "train.lr=2e-3", "train.max_steps=200",
        "policy.micro_batch_size=8", "eval.every_steps=null", "train.save_steps=1000"])
    return train_offline(cfg, quiet()).model_dir


def test_ppo_gt_raises_the_task_reward_while_kl_rises(tmp_path, sft_model_dir):
    cfg = ppo_config(tmp_path, sft_model_dir, "train.max_steps=60", "eval.every_steps=null", "train.save_steps=30")
    result = train(cfg, quiet())
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(1, 61))
    for name in ("kl", "kl_coef", "clipfrac", "approx_kl", "policy_loss", "value_loss", "explained_variance",
                 "entropy", "reward", "response_length", "time/generate", "time/score", "time/reward", "time/reference",
                 "time/values", "time/update"):
        assert all(f"ppo/{name}" in m for m in metrics), name
    final = result.final_metrics
    print(f"PPO-GT, 60 iterations: eval/reward {final['eval/reward']:.3f} (reference "
          f"{final['eval/reference_reward']:.3f}), eval/kl {final['eval/kl']:.2f}")
    assert final["eval/reward"] >= final["eval/reference_reward"] + 0.1
    assert final["eval/kl"] > 0.5
    # The critic is part of every checkpoint, and both models come back on resume.
    assert (tmp_path / "checkpoints/step60/critic").is_dir()
    from mlflow import MlflowClient

    history = MlflowClient(f"sqlite:///{tmp_path.parent}/mlflow.db").get_metric_history(result.run_id, "eval/reward")
    assert [m.step for m in history] == [0, 60]


def test_lora_ppo_with_the_adapters_off_as_reference_raises_the_task_reward(tmp_path, sft_model_dir):
    """configs/tiny/ppo_lora.yaml: LoRA adapters on policy and critic, the reference the policy's own
    base model on its ranks (ref.mode adapters_off): no reference role, one copy of the weights."""
    from transformers import AutoModelForCausalLM

    cfg = load_config(ROOT / "configs/tiny/ppo_lora.yaml", [f"model.path={sft_model_dir}", f"output_dir={tmp_path}",
                                                           "eval.every_steps=null"])
    result = train(cfg, quiet())
    final = result.final_metrics
    print(f"LoRA PPO-GT, {cfg.train.max_steps} iterations: eval/reward {final['eval/reward']:.3f} ± "
          f"{final['eval/reward_se']:.3f} (reference {final['eval/reference_reward']:.3f}), eval/kl "
          f"{final['eval/kl']:.2f}, win rate {final['eval/win_rate']:.2f} ± {final['eval/win_rate_se']:.2f}")
    assert final["eval/reward"] >= final["eval/reference_reward"] + 0.03
    assert final["eval/win_rate"] - 2 * final["eval/win_rate_se"] > 0.5
    assert "reference_startup_seconds" not in result.timings  # no reference ranks
    # One copy of the base weights on the policy rank: the base model's bytes plus the adapters'.
    base_bytes = sum(p.numel() * 4 for p in AutoModelForCausalLM.from_pretrained(sft_model_dir).parameters())
    (memory,) = result.memory
    assert memory["param_bytes"] == base_bytes + memory["trainable_param_bytes"]
    assert 0 < memory["trainable_param_bytes"] < 0.5 * base_bytes
    assert (tmp_path / "adapter/adapter_config.json").is_file() and not (tmp_path / "model").exists()


def test_lora_ppo_adapters_off_is_the_same_reference_as_a_separate_role(tmp_path, tiny_model_dir, ray_local):
    """On two ZeRO-3 ranks, the reference as the adapters switched off gives the iterations a
    separate reference role (holding the base model) gives."""
    runs = {}
    for mode in ("cache", "adapters_off"):
        cfg = load_config(ROOT / "configs/tiny/ppo_lora.yaml", [
            f"model.path={tiny_model_dir}", f"output_dir={tmp_path / mode}", *FAST, "train.max_steps=3",
            # Critic-free (RLOO): two policy ranks and a reference rank fit the tests' local Ray.
            "policy.num_workers=2", f"ref.mode={mode}", "train.lr=5e-3", "ppo.advantage=rloo",
            "ppo.samples_per_prompt=2", "ppo.rollout_prompts=4"])
        train(cfg, quiet())
        runs[mode] = read_metrics(tmp_path / mode)
    kls = [m["ppo/kl"] for m in runs["cache"]]
    assert kls[0] == pytest.approx(0.0, abs=1e-5) and abs(kls[-1]) > 1e-3  # the policy moved from its base
    for key in ("ppo/kl", "ppo/reward", "ppo/policy_loss"):
        assert [m[key] for m in runs["adapters_off"]] == pytest.approx([m[key] for m in runs["cache"]], abs=1e-5), key


def experience_of(policy_group, tokenizer):
    """A fixed rollout batch of 8: sampled once, with made-up advantages, values and returns."""
    prompts = [tokenizer(p).input_ids for p in ["The movie was", "I did not", "What a", "This is the"] * 2]
    samples = policy_group.split("generate", prompts, {"max_new_tokens": 6}, 0)
    g = torch.Generator().manual_seed(0)

    def per_token(scale):
        return [(torch.randn(len(s["completion_ids"]), generator=g) * scale).tolist() for s in samples]

    return {"prompt_ids": prompts, "completion_ids": [s["completion_ids"] for s in samples],
            "old_logps": [s["logprobs"] for s in samples], "advantages": per_token(1.0),
            "old_values": per_token(0.1), "returns": per_token(1.0)}


def test_two_ranks_take_the_same_first_update_as_one_rank_with_twice_the_micro_batch(tmp_path, tiny_model_dir,
                                                                                      tiny_tokenizer, ray_local):
    from prefopt.cluster.worker_group import WorkerGroup
    from prefopt.workers.ppo import CriticWorker, PPOPolicyWorker

    plan = [[0, 1, 2, 3], [4, 5, 6, 7], [7, 2, 5, 0], [1, 6, 3, 4]]  # two epochs of two minibatches of 4
    after: dict[str, tuple] = {}
    experience = None
    for name, (ranks, micro) in {"1x4": (1, 4), "2x2": (2, 2)}.items():
        cfg = ppo_config(tmp_path / name, tiny_model_dir, f"policy.num_workers={ranks}",
                         f"policy.micro_batch_size={micro}", "train.lr=1e-3", "policy.deepspeed.gradient_clipping=0",
                         "critic.deepspeed.gradient_clipping=0")
        policy = WorkerGroup(PPOPolicyWorker, cfg.policy, cfg.cluster, name="policy", key="policy",
                             init_args=(cfg.model_dump_json(),))
        critic = WorkerGroup(CriticWorker, cfg.critic_role, cfg.cluster, name="critic", key="critic",
                             init_args=(cfg.model_dump_json(),))
        try:
            policy.call("setup", str(tiny_model_dir), schedule={"max_steps": 4})
            critic.call("setup", str(tiny_model_dir), schedule={"max_steps": 4, "gradient_accumulation_steps": 4 // (ranks * micro)})
            experience = experience or experience_of(policy, tiny_tokenizer)
            items = [{"prompt_ids": p, "completion_ids": c}
                     for p, c in zip(experience["prompt_ids"], experience["completion_ids"], strict=True)]
            metrics = policy.call("update", experience, plan)[0]
            critic.call("update", experience, plan)
            after[name] = (policy.split("score", items), critic.split("score", items), metrics)
        finally:
            policy.shutdown()
            critic.shutdown()
    moved = max(abs(a - b) for new, old in zip(after["1x4"][0], experience["old_logps"], strict=True)
                for a, b in zip(new, old, strict=True))
    assert moved > 1e-2  # the update changed the policy, so equality below means something
    for role in (0, 1):
        one, two = after["1x4"][role], after["2x2"][role]
        for a, b in zip(one, two, strict=True):
            assert a == pytest.approx(b, abs=1e-4)
    assert after["1x4"][2]["clipfrac"] > 0  # four steps at this lr leave the trust region


def test_killed_ppo_run_resumes_to_the_same_final_metrics(tmp_path, tiny_model_dir, ray_local):
    steps = ["train.max_steps=6", "train.save_steps=2", "train.log_steps=1"]
    straight = ppo_config(tmp_path / "straight", tiny_model_dir, *FAST, *steps, "ppo.kl_target=1",
                          "ppo.kl_horizon=100")
    expected_final = train(straight, quiet()).final_metrics
    expected = read_metrics(tmp_path / "straight")

    out = tmp_path / "killed"
    sets = [*FAST, *steps, "ppo.kl_target=1", "ppo.kl_horizon=100", f"output_dir={out}",
            f"model.path={tiny_model_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "prefopt", "train", str(TINY_PPO), *(a for s in sets for a in ("--set", s))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=os.environ | {"DS_ACCELERATOR": "cpu"})
    deadline = time.time() + 300
    while not list(out.glob("checkpoints/step*/trainer_state.json")) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its local Ray and its workers
    proc.wait()
    assert len(read_metrics(out)) < 6, "the run finished before it could be killed"

    resumed_cfg = ppo_config(out, tiny_model_dir, *FAST, *steps, "ppo.kl_target=1", "ppo.kl_horizon=100")
    resumed_final = train(resumed_cfg, quiet()).final_metrics
    resumed = read_metrics(out)
    assert [m["step"] for m in resumed] == list(range(1, 7))
    # The adaptive coefficient moved (its state is in the checkpoint), and everything matches.
    assert expected[-1]["ppo/kl_coef"] != expected[0]["ppo/kl_coef"]
    for key in ("ppo/reward", "ppo/kl", "ppo/kl_coef", "ppo/policy_loss", "ppo/value_loss"):
        assert resumed[-1][key] == pytest.approx(expected[-1][key], abs=1e-5), key
    for key in ("eval/reward", "eval/kl"):
        assert resumed_final[key] == pytest.approx(expected_final[key], abs=1e-5), key


@pytest.mark.parametrize("advantage", ["rloo", "grpo"])
def test_critic_free_estimators_run_without_a_critic(tmp_path, tiny_model_dir, ray_local, advantage, monkeypatch):
    from prefopt.losses import ppo as L

    # Watch the controller's advantages (computed in this process): which estimator ran, on what.
    calls = []
    estimator = getattr(L, f"{advantage}_advantages")

    def watched(scores, k, *args, **kwargs):
        out = estimator(scores, k, *args, **kwargs)
        calls.append((scores.clone(), k, out.clone()))
        return out

    def no_gae(*args, **kwargs):
        raise AssertionError("GAE ran in a critic-free run")

    monkeypatch.setattr(L, f"{advantage}_advantages", watched)
    monkeypatch.setattr(L, "gae", no_gae)
    cfg = ppo_config(tmp_path, tiny_model_dir, *FAST, "train.max_steps=2", f"ppo.advantage={advantage}",
                     "ppo.samples_per_prompt=4", "ppo.rollout_prompts=2")
    train(cfg, quiet())
    metrics = read_metrics(tmp_path)
    assert len(metrics) == 2
    assert "ppo/value_loss" not in metrics[-1] and "ppo/time/critic_update" not in metrics[-1]
    assert not (tmp_path / "checkpoints/step2/critic").exists()
    assert metrics[-1]["ppo/approx_kl"] > 0  # the policy moved
    # No values anywhere (only a critic's run logs them), and the estimator ran once per iteration
    # on 2 prompts x 4 samples: RLOO's advantages sum to 0 over each prompt's samples (each is its
    # score minus its siblings' mean); GRPO's have mean 0 and standard deviation 1 in each group
    # whose scores differ (a group of equal scores divides float noise by eps: left out).
    assert not any({"ppo/value_mean", "ppo/explained_variance"} & m.keys() for m in metrics)
    assert [(scores.shape, k) for scores, k, _ in calls] == [(torch.Size([8]), 4)] * 2
    for scores, _, advantages in calls:
        groups, per_prompt = scores.reshape(2, 4), advantages.reshape(2, 4)
        if advantage == "rloo":  # r_i − mean of the other three, worked out here
            torch.testing.assert_close(per_prompt.sum(1), torch.zeros(2), atol=1e-5, rtol=0)
            torch.testing.assert_close(per_prompt, groups - (groups.sum(1, keepdim=True) - groups) / 3)
        else:
            spread = groups.std(1) > 1e-2
            torch.testing.assert_close(per_prompt[spread].mean(1), torch.zeros(int(spread.sum())), atol=1e-5, rtol=0)
            torch.testing.assert_close(per_prompt[spread].std(1), torch.ones(int(spread.sum())), atol=1e-4, rtol=0)
    if advantage == "grpo":  # at least one group had something to rank, or the check above was empty
        assert any((scores.reshape(2, 4).std(1) > 1e-2).any() for scores, _, _ in calls)


def test_ppo_on_a_trained_reward_model(tmp_path, tiny_model_dir, ray_local):
    """reward.source: model, the critic initialised from the reward model (its scalar head)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = tmp_path / "rm"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = model.config.eos_token_id
    with torch.no_grad():  # a reward model that scores everything 0: the task would give ~0.6
        model.score.weight.zero_()
    model.save_pretrained(rm)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(rm)
    cfg = ppo_config(tmp_path / "run", tiny_model_dir, *FAST, "train.max_steps=2", "reward.source=model",
                     f"reward.model_path={rm}", f"critic.model_path={rm}")
    train(cfg, quiet())
    metrics = read_metrics(tmp_path / "run")
    assert len(metrics) == 2
    assert [m["ppo/reward"] for m in metrics] == [0.0, 0.0]  # the reward model's scores, not the task's
    assert metrics[0]["ppo/value_mean"] == 0.0  # the critic starts from the same zero head


def test_bad_ppo_settings_fail_before_anything_starts(tmp_path, tiny_model_dir):
    from prefopt.algorithms.stages import PreflightError
    from prefopt.config import ConfigError

    with pytest.raises(ConfigError, match="samples_per_prompt: 2 or more"):
        ppo_config(tmp_path, tiny_model_dir, "ppo.advantage=rloo")
    with pytest.raises(PreflightError, match="does not cut into minibatches"):
        train(ppo_config(tmp_path, tiny_model_dir, "ppo.rollout_prompts=6"), quiet())
    with pytest.raises(PreflightError, match="reward.source: judge"):
        train(ppo_config(tmp_path, tiny_model_dir, "reward.source=judge", f"reward.model_path={tiny_model_dir}"),
              quiet())
    assert not (tmp_path / "checkpoints").exists()

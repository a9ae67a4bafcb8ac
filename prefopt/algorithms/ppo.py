"""PPO (`algorithm.name: ppo`): the controller, top to bottom.

    result = train(cfg, console)

Four roles, each a group of engine workers: the policy (trained, ZeRO-3; samples the rollouts
on its own ranks), the reference (frozen; per-token log-probs of the rollouts, answered
online), the critic (trained, scalar head; per-token values; only for advantage: gae) and the
reward (the built-in task's ground truth on the controller — the DPO paper's PPO-GT — or a
trained reward model on its own ranks). One train step is one PPO iteration:

    prompts      ppo.rollout_prompts of the data, K = ppo.samples_per_prompt times each
    generate     policy ranks, or vLLM engines (rollout.engine): completions and their log-probs
                 (the policy's own forward's; an engine's are logged beside them)
    score        at once, each role on its own ranks (a task reward on the controller meanwhile):
                   reward      one number per completion (EOS penalty, whitening, clipping)
                   reference   per-token log-probs -> per-token KL (k1, k2 or k3)
                   values      the critic's per-token values
    advantages   controller: rewards shaped (score at the last token, -kl_coef * KL per token),
                 GAE(gamma, lam), whitened over the batch; or RLOO / GRPO baselines over the K samples
    update       policy and critic at once: ppo.epochs x minibatches, one optimizer step each
    KL control   fixed coefficient, or the adaptive controller toward ppo.kl_target

The maths lives in prefopt.losses.ppo; the update loops in prefopt.workers.ppo; the shared
loop, checkpoints, health guard and evaluation in prefopt.algorithms.stages. A checkpoint holds
the policy, the critic (checkpoints/step<N>/critic), the KL controller and every RNG; the
rollouts of iteration N depend only on (seed, N) and the weights, so a resumed run is exact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from prefopt.algorithms import stages
from prefopt.algorithms.session import Session, TrainResult
from prefopt.config import PPOConfig, RunConfig


@dataclass
class Batches:
    """How a rollout batch is cut: minibatch = policy.micro_batch_size x
    train.gradient_accumulation_steps x policy.num_workers samples, one optimizer step each."""

    rollout: int
    minibatch: int
    critic_accumulation: int

    @property
    def minibatches(self) -> int:
        return self.rollout // self.minibatch


def batches(cfg: RunConfig) -> Batches:
    p, pol, critic = cfg.ppo, cfg.policy, cfg.critic_role
    rollout = p.rollout_prompts * p.samples_per_prompt
    minibatch = pol.micro_batch_size * cfg.train.gradient_accumulation_steps * pol.num_workers
    if rollout % minibatch:
        raise stages.PreflightError(
            f"ppo: a rollout batch of {rollout} samples (ppo.rollout_prompts x ppo.samples_per_prompt) does not cut "
            f"into minibatches of {minibatch} (policy.micro_batch_size x train.gradient_accumulation_steps x "
            "policy.num_workers); make the first a multiple of the second")
    per_step = critic.micro_batch_size * critic.num_workers
    if cfg.ppo.advantage == "gae" and minibatch % per_step:
        raise stages.PreflightError(
            f"ppo: the critic's ranks take {per_step} samples per forward (critic.micro_batch_size x "
            f"critic.num_workers), which does not divide the minibatch of {minibatch}; change critic.micro_batch_size")
    return Batches(rollout, minibatch, minibatch // per_step)


# ----------------------------------------------------------------------------- the maths of one batch


def padded(rows: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged per-token lists -> right-padded [N, T] fp32 and its mask."""
    width = max(len(r) for r in rows)
    values = torch.zeros(len(rows), width)
    mask = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        values[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
        mask[i, : len(r)] = 1.0
    return values, mask


def ragged(values: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
    return [row[m.bool()].tolist() for row, m in zip(values, mask, strict=True)]


def make_experience(p: PPOConfig, kl_coef: float, *, logps: list[list[float]], ref_logps: list[list[float]],
                    values: list[list[float]] | None, scores: list[float], ended: list[bool]) -> tuple[dict, dict]:
    """The controller's half of an iteration, from what the roles returned: per-token
    advantages (and returns for the critic), and the batch's metrics. Samples of one prompt are
    contiguous (K = p.samples_per_prompt)."""
    from prefopt.losses import ppo as L

    logp, mask = padded(logps)
    ref, _ = padded(ref_logps)
    raw = torch.tensor(scores, dtype=torch.float32)
    score = raw.clone()
    not_ended = ~torch.tensor(ended)
    if p.missing_eos_penalty is not None:  # TRL's missing_eos_penalty: a completion must end
        score = score - p.missing_eos_penalty * not_ended.float()
    if p.whiten_rewards:
        score = L.whiten(score[:, None], torch.ones_like(score)[:, None])[:, 0]
    if p.reward_clip is not None:
        score = score.clamp(-p.reward_clip, p.reward_clip)
    kl = L.kl_penalty(logp, ref, mask, p.kl_estimator)  # [N, T], 0 on padding
    out: dict = {"old_logps": logps}
    metrics = {}
    if p.advantage == "gae":
        v, _ = padded(values)
        rewards = L.shape_rewards(score, kl, mask, kl_coef)
        advantages, returns = L.gae(rewards, v, mask, p.gamma, p.lam)
        out |= {"old_values": values, "returns": ragged(returns, mask)}
        metrics["ppo/explained_variance"] = L.explained_variance(v, returns, mask)
        metrics["ppo/value_mean"] = float((v * mask).sum() / mask.sum())
    else:
        # Critic-free: the KL penalty enters each sequence's reward, then the baseline of its K siblings.
        sequence_reward = score - kl_coef * kl.sum(1)
        baseline = L.rloo_advantages if p.advantage == "rloo" else L.grpo_advantages
        advantages = L.sequence_to_tokens(baseline(sequence_reward, p.samples_per_prompt), mask)
    if p.whiten_advantages:
        advantages = L.whiten(advantages, mask)
    out["advantages"] = ragged(advantages, mask)
    metrics |= {
        "ppo/reward": float(raw.mean()),
        "ppo/score": float(score.mean()),  # after the EOS penalty, whitening and clipping
        "ppo/kl": float(((logp - ref) * mask).sum(1).mean()),  # k1 summed over each completion: nats/sequence
        "ppo/kl_penalty": float(kl.sum(1).mean()),  # the chosen estimator, summed likewise
        "ppo/kl_coef": kl_coef,
        "ppo/response_length": float(mask.sum(1).mean()),
        "ppo/no_eos": float(not_ended.float().mean()),
        "ppo/advantage_std": float(advantages[mask.bool()].std()) if mask.sum() > 1 else 0.0,
    }
    return out, metrics


def minibatch_plan(seed: int, step: int, n: int, minibatch: int, epochs: int) -> list[list[int]]:
    """The sample indices of each optimizer step: every epoch a fresh permutation of the batch,
    cut into minibatches; a function of (seed, step), so a resumed run replays it."""
    rng = np.random.default_rng([seed, step])
    plan = []
    for _ in range(epochs):
        order = rng.permutation(n).tolist()
        plan += [order[s : s + minibatch] for s in range(0, n, minibatch)]
    return plan


# ----------------------------------------------------------------------------- the roles


def check_ppo(cfg: RunConfig) -> Batches:
    """PPO's own checks, before anything starts."""
    from prefopt.algorithms.scoring import check_reward

    check_reward(cfg, for_ppo=True)
    return batches(cfg)


def schedules(cfg: RunConfig, b: Batches) -> tuple[dict, dict]:
    """The train-section fields of the policy's and the critic's engines: an optimizer step per
    minibatch, so the LR schedule counts max_steps x epochs x minibatches of them."""
    steps = cfg.train.max_steps * cfg.ppo.epochs * b.minibatches
    policy = {"max_steps": steps}
    critic = {"max_steps": steps, "gradient_accumulation_steps": b.critic_accumulation,
              "lr": cfg.critic.lr or cfg.train.lr}
    return policy, critic


# ----------------------------------------------------------------------------- one iteration's phases


class PhaseClock:
    """ppo/time/<phase>: the phases of an iteration one after another (step_seconds is their sum);
    ppo/time/<role>: a role's own seconds inside a phase, counted from the phase's start (they overlap)."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self.clock = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.times[f"ppo/time/{phase}"] = now - self.clock
        self.clock = now

    def mark(self, role: str, seconds: float | None = None) -> None:
        self.times[f"ppo/time/{role}"] = time.perf_counter() - self.clock if seconds is None else seconds

    @property
    def step_seconds(self) -> float:
        return sum(v for k, v in self.times.items() if k.removeprefix("ppo/time/") in PHASES)


PHASES = ("generate", "score", "advantages", "update")


def rollout_prompts(cfg: RunConfig, step: int, num_prompts: int) -> list[int]:
    """The prompt indices of iteration `step`, each samples_per_prompt times in a row: a function
    of (data.seed, step), so a resumed run draws the same."""
    p = cfg.ppo
    rng = np.random.default_rng([cfg.data.seed, step])
    chosen = rng.choice(num_prompts, p.rollout_prompts, replace=num_prompts < p.rollout_prompts)
    return [int(i) for i in chosen for _ in range(p.samples_per_prompt)]


def score_rollouts(reference, critic, scorer, items: list[dict], texts: tuple[list, list],
                   clock: PhaseClock) -> dict[str, list]:
    """Reference log-probs, the critic's values and the rewards, all at once on their own groups
    (a task's rewards compute on the controller meanwhile). -> {reference, values, reward}."""
    from prefopt.cluster.worker_group import as_completed

    calls = {"reference": reference.split_async("score", items)}
    if critic is not None:
        calls["values"] = critic.split_async("score", items)
    calls["reward"] = scorer.score_async(*texts)
    scored = {"values": None}
    for name, result in as_completed(calls):
        scored[name] = result
        clock.mark(name)
    return scored


def update(policy, critic, experience: dict, plan: list[list[int]], clock: PhaseClock) -> dict[str, float]:
    """Policy and critic take their optimizer steps on the batch at once. -> their metrics."""
    import ray

    from prefopt.workers.trainer import mean_metrics

    shared = ray.put(experience)  # once into the object store, read by every rank of both roles
    updates = {"policy": (policy, policy.call_async("update", shared, plan))}
    if critic is not None:
        updates["critic"] = (critic, critic.call_async("update", shared, plan))
    metrics: dict[str, float] = {}
    for name, (group, refs) in updates.items():
        per_rank = group.wait(refs, "update")
        clock.mark(f"{name}_update", max(m.pop("seconds") for m in per_rank))
        combined = mean_metrics(per_rank)
        if name == "policy":
            metrics |= {f"ppo/{k}": v for k, v in combined.items() if k != "grad_norm"}
            metrics |= {"grad_norm": combined["grad_norm"]} if "grad_norm" in combined else {}
        else:
            metrics |= {f"ppo/{'critic_' if k == 'grad_norm' else ''}{k}": v for k, v in combined.items()}
    return metrics


# ----------------------------------------------------------------------------- the controller


def train(cfg: RunConfig, console, *, resume: bool | None = None) -> TrainResult:
    from prefopt.algorithms.scoring import start_scorer
    from prefopt.losses.ppo import kl_controller

    p = cfg.ppo
    b = check_ppo(cfg)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"format": "prompt_only"})})
    policy_schedule, critic_schedule = schedules(cfg, b)
    sampling = p.sampling.model_dump(exclude={"seed"})

    with Session.open(cfg, console, resume=resume) as s:
        prompt_texts = s.inputs.data.table["prompt"].to_pylist()
        prompt_ids = s.inputs.data.table["prompt_ids"].to_pylist()
        eos = s.inputs.tokenizer.eos_token_id
        if cfg.ref.mode != "adapters_off":
            s.start_reference()
        scorer = s.own(start_scorer(cfg, console))  # the task's truth here, or a reward model on its ranks
        kl = kl_controller(p.kl_coef, p.kl_target, p.kl_horizon)
        if s.run.checkpoint is not None:
            kl.load_state_dict(s.run.checkpoint[1]["kl_controller"])
        s.state["kl_controller"] = kl.state_dict()

        with s.tracking():
            policy = s.start("policy", "setup", s.inputs.rank_model_dir(), schedule=policy_schedule)
            critic = None
            if p.advantage == "gae":
                critic = s.start("critic", "setup", cfg.critic.model_path or s.inputs.rank_model_dir(),
                                 schedule=critic_schedule)
            # After the policy: with ref.mode adapters_off (LoRA) the reference is its ranks, adapters off.
            reference = s.start_reference()
            evaluator = s.evaluator()
            sampler = s.sampler(policy)  # the policy's ranks, or vLLM engines synced after each update

            def iteration(step: int) -> dict[str, float]:
                """PPO iteration `step` (0-based): rollouts, scores, advantages, the update."""
                clock = PhaseClock()
                picked = rollout_prompts(cfg, step, len(prompt_ids))
                prompts = [prompt_ids[i] for i in picked]
                samples = sampler.split("generate", prompts, sampling, p.sampling.seed * 1_000_003 + step)
                completions = [x["completion_ids"] for x in samples]
                clock.lap("generate")
                items = [{"prompt_ids": q, "completion_ids": c} for q, c in zip(prompts, completions, strict=True)]
                texts = ([prompt_texts[i] for i in picked], [x["text"] for x in samples])
                scored = score_rollouts(reference, critic, scorer, items, texts, clock)
                clock.lap("score")
                experience, metrics = make_experience(
                    p, kl.coef, logps=[x["logprobs"] for x in samples], ref_logps=scored["reference"],
                    values=scored["values"], scores=scored["reward"], ended=[c[-1] == eos for c in completions])
                experience |= {"prompt_ids": prompts, "completion_ids": completions}
                clock.lap("advantages")
                plan = minibatch_plan(cfg.train.seed, step, b.rollout, b.minibatch, p.epochs)
                metrics |= update(policy, critic, experience, plan, clock)
                clock.lap("update")
                sampler.updated(step + 1)  # vLLM engines take the new weights now, checked
                metrics |= sampler.metrics()  # rollout/*: that sync, its check, engine vs policy log-probs
                kl.update(metrics["ppo/kl"], b.rollout)
                s.state["kl_controller"] = kl.state_dict()
                return metrics | clock.times | {"loss": metrics["ppo/policy_loss"], "step_seconds": clock.step_seconds,
                                                "tokens": float(sum(len(c) for c in completions))}

            def steps(first: int, count: int) -> list[dict[str, float]]:
                return [iteration(step) for step in range(first, first + count)]

            save = s.saver("policy", *(["critic"] if critic is not None else []))
            # PPO's policy loss sits near zero and changes sign: only non-finite values stop the run.
            metrics = s.train(steps, save, s.evaluation(evaluator, policy), loss_ratio_guard=False)
            return s.finish(policy, metrics)

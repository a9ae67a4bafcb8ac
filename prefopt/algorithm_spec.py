"""Which roles each algorithm starts, and how: the one place that decides it.

    spec = spec_for(cfg)          the algorithm `algorithm.name` belongs to
    spec.roles(cfg)               [Role]: what a run of this config starts
    spec.alive_together(cfg)      the roles whose ranks live at the same time
    spec.compute_together(cfg)    groups of roles that compute at the same time (busy cores)
    spec.tags(cfg)                the MLflow tags that name the algorithm
    spec.progress(metrics)        the progress line of a step

Preflight, submit's resource check, the local Ray's size, the tracker's tags and the dispatch
of `prefopt train` read this; nothing else decides which roles exist. A declaration: it imports
no torch, no Ray and no controller (workers and controllers are named, imported when started).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module

from prefopt.config import RoleConfig, RunConfig

# A role's name -> its section of the config (the key users write in --set and YAML).
SECTIONS = {"policy": "policy", "reference": "ref", "critic": "critic", "reward": "reward"}


@dataclass(frozen=True)
class Role:
    name: str  # policy | reference | critic | reward
    worker: str  # "module:Class" of its engine worker
    head: str = "lm"  # lm: a causal LM; scalar: a causal LM with a one-output head
    trains: bool = False

    @property
    def section(self) -> str:
        return SECTIONS[self.name]

    def config(self, cfg: RunConfig) -> RoleConfig:
        return role_config(cfg, self.name)

    def worker_class(self) -> type:
        module, name = self.worker.split(":")
        return getattr(import_module(module), name)

    def placement(self, cfg: RunConfig) -> tuple[str, str, RoleConfig]:
        """(name in messages, config section, RoleConfig): what the resource checks read."""
        return self.name, self.section, self.config(cfg)


def role_config(cfg: RunConfig, name: str) -> RoleConfig:
    """The ranks, resources and engine of a role, by its name."""
    return {"policy": cfg.policy, "reference": cfg.reference, "critic": cfg.critic_role,
            "reward": cfg.reward_role}[name]


REFERENCE = Role("reference", "prefopt.workers.reference:ReferenceWorker")
# `prefopt generate` samples on the policy's ranks with the plain engine worker (no optimizer, no data).
SAMPLER = Role("policy", "prefopt.cluster.engine_worker:EngineWorker")


def scores_on_ranks(cfg: RunConfig) -> bool:
    """Whether the reward role has ranks: a reward model, or a judge not served over HTTP."""
    return cfg.reward.source == "model" or (cfg.reward.source == "judge" and not cfg.reward.judge.endpoint)


def reward_role(cfg: RunConfig) -> Role:
    """What scores on ranks (prefopt.algorithms.scoring): a reward model (scalar head) or a judge (a causal LM)."""
    return Role("reward", "prefopt.workers.reward:RewardWorker", head="scalar" if cfg.reward.source == "model" else "lm")


@dataclass(frozen=True)
class AlgorithmSpec:
    name: str  # the `algorithm` tag in MLflow
    controller: str  # "module:function" with the signature train(cfg, console, *, resume)
    roles: Callable[[RunConfig], list[Role]]
    compute_together: Callable[[RunConfig], list[list[str]]]
    progress: Callable[[dict[str, float]], str]
    # Roles that only fill a cache and are shut down before the trained ones start.
    alive_apart: Callable[[RunConfig], list[str]] = lambda cfg: []

    def alive_together(self, cfg: RunConfig) -> list[Role]:
        apart = self.alive_apart(cfg)
        return [r for r in self.roles(cfg) if r.name not in apart]

    def role(self, cfg: RunConfig, name: str) -> Role:
        for r in self.roles(cfg):
            if r.name == name:
                return r
        raise KeyError(f"{self.name} starts no {name} role for this config")

    def tags(self, cfg: RunConfig) -> dict[str, str]:
        tags = {"algorithm": self.name}
        return tags | ({"loss": cfg.loss_name} if self.name in ("offline", "rest", "iterative_dpo") else {})

    def train(self, cfg: RunConfig, console, *, resume: bool | None = None):
        module, name = self.controller.split(":")
        return getattr(import_module(module), name)(cfg, console, resume=resume)


def _loss_line(metrics: dict[str, float], accuracy_key: str) -> str:
    acc = metrics.get(accuracy_key)
    line = f"loss {metrics['loss']:.4f}" + (f"  acc {acc:.2f}" if acc is not None else "")
    return line + f"  {metrics['tokens_per_second']:.0f} tok/s"


# ----------------------------------------------------------------------------- offline losses


def loss_needs_reference(cfg: RunConfig) -> bool:
    """The loss reads reference log-probs (a cache filled once, or live per micro-batch)."""
    from prefopt.losses.names import needs_reference

    return cfg.ref.mode != "none" and needs_reference(cfg.loss_name, **cfg.algorithm.loss_params())


def separate_reference(cfg: RunConfig) -> bool:
    """Whether the reference, when a run needs one, has ranks of its own: not with ref.mode
    adapters_off, where it is the policy's LoRA base model on the policy's ranks."""
    return cfg.ref.mode != "adapters_off"


def _offline_roles(cfg: RunConfig) -> list[Role]:
    # Evaluation on a task samples the reference too (its reward and the KL's other side).
    reference = separate_reference(cfg) and (loss_needs_reference(cfg) or cfg.data.task is not None)
    return [Role("policy", "prefopt.workers.policy:PolicyWorker", trains=True)] + ([REFERENCE] if reference else [])


def _offline_apart(cfg: RunConfig) -> list[str]:
    # A reference that only fills the cache is shut down before the policy starts.
    return ["reference"] if cfg.ref.mode != "live" and cfg.data.task is None else []


OFFLINE = AlgorithmSpec(
    name="offline",
    controller="prefopt.algorithms.offline:train",
    roles=_offline_roles,
    alive_apart=_offline_apart,
    compute_together=lambda cfg: [["policy", "reference"] if cfg.ref.mode == "live" and loss_needs_reference(cfg)
                                  else ["policy"]],
    progress=lambda m: _loss_line(m, "rewards/accuracies"),
)

REWARD_MODEL = AlgorithmSpec(
    name="reward_model",
    controller="prefopt.algorithms.reward_model:train",
    roles=lambda cfg: [Role("policy", "prefopt.workers.reward_model:RewardModelWorker", head="scalar", trains=True)],
    compute_together=lambda cfg: [["policy"]],
    progress=lambda m: _loss_line(m, "rm/accuracy"),
)


# ----------------------------------------------------------------------------- PPO


def _ppo_roles(cfg: RunConfig) -> list[Role]:
    roles = [Role("policy", "prefopt.workers.ppo:PPOPolicyWorker", trains=True)]
    roles += [REFERENCE] if separate_reference(cfg) else []
    if cfg.ppo.advantage == "gae":
        roles.append(Role("critic", "prefopt.workers.ppo:CriticWorker", head="scalar", trains=True))
    if cfg.reward.source == "model":
        roles.append(reward_role(cfg))
    return roles


def _ppo_progress(m: dict[str, float]) -> str:
    return (f"loss {m['loss']:.4f}  reward {m['ppo/reward']:.3f}  kl {m['ppo/kl']:.2f}  "
            f"{m['tokens_per_second']:.0f} tok/s")


PPO = AlgorithmSpec(
    name="ppo",
    controller="prefopt.algorithms.ppo:train",
    roles=_ppo_roles,
    # The update trains policy and critic at once; the scoring runs reference, critic and reward at once.
    compute_together=lambda cfg: [["policy", "critic"], ["reference", "critic", "reward"]],
    progress=_ppo_progress,
)


# ----------------------------------------------------------------------------- ReST, iterative DPO


def _rounds_roles(cfg: RunConfig) -> list[Role]:
    """One policy that samples and trains; the reference when evaluation or the loss reads the
    starting model (a round_start reference is the policy itself, before the round); the reward
    role when scoring runs on ranks."""
    initial = cfg.algorithm.name == "rest" or cfg.iterative.reference == "initial"
    reference = cfg.data.task is not None or (loss_needs_reference(cfg) and initial)
    roles = [Role("policy", "prefopt.workers.policy:PolicyWorker", trains=True)] + ([REFERENCE] if reference else [])
    return roles + ([reward_role(cfg)] if scores_on_ranks(cfg) else [])


def _rounds(name: str) -> AlgorithmSpec:
    return AlgorithmSpec(
        name=name,
        controller="prefopt.algorithms.rounds:train",
        roles=_rounds_roles,
        # Grow scores on the reward role while the policy waits; training is the policy's alone.
        compute_together=lambda cfg: [["policy"], ["reference"], ["reward"]],
        progress=lambda m: _loss_line(m, "rewards/accuracies"),
    )


REST = _rounds("rest")
ITERATIVE_DPO = _rounds("iterative_dpo")


def spec_for(cfg: RunConfig) -> AlgorithmSpec:
    from prefopt.losses.names import REWARD_LOSSES

    if cfg.algorithm.name == "ppo":
        return PPO
    if cfg.algorithm.name == "rest":
        return REST
    if cfg.algorithm.name == "iterative_dpo":
        return ITERATIVE_DPO
    if cfg.algorithm.name in REWARD_LOSSES:
        return REWARD_MODEL
    return OFFLINE


def placements(cfg: RunConfig, roles: list[Role] | None = None) -> list[tuple[str, str, RoleConfig]]:
    """(name, section, RoleConfig) of the roles a run of `cfg` starts (all of them by default)."""
    return [r.placement(cfg) for r in (spec_for(cfg).roles(cfg) if roles is None else roles)]


def busy_cpus(cfg: RunConfig) -> float:
    """The most CPUs that ranks computing at the same moment ask for."""
    started = {r.name for r in spec_for(cfg).roles(cfg)}

    def cpus(names: list[str]) -> float:
        return sum(role_config(cfg, n).num_workers * role_config(cfg, n).cpus_per_worker
                   for n in names if n in started)

    return max(cpus(group) for group in spec_for(cfg).compute_together(cfg))


def trial_bundles(cfg: RunConfig) -> tuple[list[dict[str, float]], dict[str, list[int]]]:
    """What a sweep trial reserves for a run of `cfg` (prefopt.sweep): the bundles of one
    placement group, and which bundles each role's ranks take. Roles alive together take bundles
    of their own; a role alive apart (a reference that only fills the cache) reuses bundles of the
    same shape of a role started after it, so the trial holds no more than it computes on."""
    from prefopt.cluster.worker_group import bundle_of

    spec = spec_for(cfg)
    bundles: list[dict[str, float]] = []
    slots: dict[str, list[int]] = {}
    for role in spec.alive_together(cfg):
        rc = role.config(cfg)
        slots[role.name] = list(range(len(bundles), len(bundles) + rc.num_workers))
        bundles += [bundle_of(rc) for _ in range(rc.num_workers)]
    for name in spec.alive_apart(cfg):
        rc, shape = role_config(cfg, name), bundle_of(role_config(cfg, name))
        same = [i for i, b in enumerate(bundles) if b == shape]
        if len(same) >= rc.num_workers:
            slots[name] = same[: rc.num_workers]
        else:
            slots[name] = list(range(len(bundles), len(bundles) + rc.num_workers))
            bundles += [shape for _ in range(rc.num_workers)]
    if cfg.rollout.engine == "vllm" and "policy" in slots:  # vLLM engines live beside the policy
        engines = cfg.rollout.as_role(on_gpus=cfg.policy.gpus_per_worker > 0)
        slots["rollout"] = list(range(len(bundles), len(bundles) + engines.num_workers))
        bundles += [bundle_of(engines) for _ in range(engines.num_workers)]
    return bundles, slots

"""Session: one run of one algorithm, and everything it owns.

    with Session.open(cfg, console, resume=resume) as s:   preflight, run directory, inputs
        ref = s.start("reference", ...)                     a role's group (connects Ray first)
        with s.tracking(tags):                              the MLflow run (s.tracker)
            policy = s.start("policy", ...)                 trained roles resume from the checkpoint
            metrics = s.train(steps, s.saver("policy"), evaluate)
            return s.finish(policy, metrics)                export, log the model -> TrainResult

The session owns the run's store and checkpoints (`s.run`), its inputs (`s.inputs`: model,
tokenizer, tokenized data), its tracker and the groups it started: leaving the `with` block shuts
every group down, whatever happened. Which roles exist, their workers and heads come from the
algorithm's spec (prefopt.algorithm_spec); a controller only says when each starts and stops.
The stages it calls live in prefopt.algorithms.stages; a multi-round recipe calls them on the
groups the session started, without reloading a model.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from prefopt.algorithm_spec import AlgorithmSpec, placements, role_config, spec_for
from prefopt.algorithms import stages
from prefopt.config import RunConfig


@dataclass
class TrainResult:
    output_dir: str  # a local path or a store's URI (prefopt.storage)
    model_dir: str  # the exported model: output_dir/model
    final_metrics: dict[str, float]
    steps: int
    run_id: str
    timings: dict[str, float]
    param_bytes: list[int]  # parameter bytes held by each rank (its ZeRO-3 partition)
    # Each rank's bytes at the end: param_bytes, trainable_param_bytes, optimizer_state_bytes (EngineWorker.memory)
    memory: list[dict[str, int]] = field(default_factory=list)


@dataclass
class Session:
    cfg: RunConfig
    console: object
    spec: AlgorithmSpec
    run: stages.Run
    inputs: stages.Inputs
    groups: dict = field(default_factory=dict)  # role name -> its started WorkerGroup
    infos: dict = field(default_factory=dict)  # role name -> what each rank's setup returned
    owned: list = field(default_factory=list)  # other things with shutdown() (a scorer's group)
    tracker: object = None
    timings: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)  # saved in every checkpoint's state file
    state_objects: dict = field(default_factory=dict)  # made once per session: the sampler

    @classmethod
    @contextmanager
    def open(cls, cfg: RunConfig, console, *, resume: bool | None = None):
        """Checks in seconds, then the run directory and the inputs; nothing is started yet."""
        spec = spec_for(cfg)
        stages.preflight(cfg, console)
        run = stages.open_run(cfg, resume)
        inputs = stages.prepare_inputs(cfg, console)
        run.check_data(inputs.data)
        session = cls(cfg, console, spec, run, inputs, state={"data_fingerprint": inputs.data.fingerprint})
        try:
            yield session
        finally:
            session.shutdown()

    # ------------------------------------------------------------------ groups

    def start(self, name: str, setup: str = "setup", *args, **kwargs):
        """Start role `name` (its spec: worker, ranks) and call `setup` on every rank. A role that
        trains resumes from the run's checkpoint (the policy's at checkpoints/step<N>, another
        trained role's in its sub-folder) and says so. -> the group."""
        role = self.spec.role(self.cfg, name)
        stages.connect(self.cfg)  # once per process; sized for every role of the spec
        t0 = time.perf_counter()
        group, infos = stages.start_group(self.cfg, name, self.console, role.worker_class(), setup, *args, **kwargs)
        self.groups[name], self.infos[name] = group, infos
        if role.trains:
            self._report(name, group, infos)
            if self.run.checkpoint is not None:
                part = None if name == "policy" else name
                group.call("load_checkpoint", *stages.checkpoint_location(self.run, self.run.start_step, part))
                if part is None:
                    self.console.print(f"resumed from {self.run.checkpoint_dir(self.run.checkpoint[0])} "
                                       f"at step {self.run.start_step}")
        # startup_seconds: the trained roles' (the benchmarks read it); a frozen role's under its name.
        key = "startup_seconds" if role.trains else f"{name}_startup_seconds"
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t0
        return group

    def _report(self, name: str, group, infos: list[dict]) -> None:
        stage = infos[0]["zero_stage"]
        asked = role_config(self.cfg, name).deepspeed.zero_stage
        why = "" if stage == asked else f" ({asked} asked: one rank has nothing to partition)"
        held, trained = infos[0]["param_bytes"], infos[0]["trainable_param_bytes"]
        lora = f" ({trained / 2**20:.2f} MiB of LoRA adapters train)" if trained < held else ""
        self.console.print(f"{name}: {group.size} rank(s), ZeRO stage {stage}{why}, "
                           f"{held / 2**20:.2f} MiB of parameters on rank 0{lora}")

    def start_reference(self):
        """The reference role, holding the data (started once; later calls give the same group).
        With ref.mode adapters_off (LoRA), the started policy's ranks with the adapters off."""
        if self.cfg.ref.mode == "adapters_off":
            return AdaptersOff(self.groups["policy"])
        if "reference" not in self.groups:
            self.start("reference", "setup", self.inputs.rank_reference_dir(self.cfg), self.inputs.rank_data_path())
        return self.groups["reference"]

    def stop(self, name: str) -> None:
        """Shut a role's group down now (e.g. a reference whose cache is filled): its devices are free."""
        group = self.groups.pop(name, None)
        if group is not None:
            group.shutdown()

    def own(self, thing):
        """Shut `thing` down with the session (a scorer that started its own group). -> thing."""
        self.owned.append(thing)
        return thing

    def shutdown(self) -> None:
        for thing in reversed(self.owned):
            thing.shutdown()
        self.owned.clear()
        for name in reversed(list(self.groups)):
            self.stop(name)

    # ------------------------------------------------------------------ tracking, the loop, the end

    @contextmanager
    def tracking(self, tags: dict | None = None):
        """The run's MLflow run (continued on resume): config, data and the algorithm's tags."""
        from prefopt.tracking import Tracker
        from prefopt.tracking.tracker import TAG_DATA_FINGERPRINT

        tags = {TAG_DATA_FINGERPRINT: self.inputs.data.fingerprint} | (tags or {})  # + the spec's, by the tracker
        with Tracker.start(self.cfg, run_id=self.run.mlflow_run_id, tags=tags) as tracker:
            self.tracker = tracker
            tracker.log_config()
            tracker.log_data_input(self.inputs.data)
            # The GPUs the run holds (its roles' ranks): compare turns its wall time into GPU-hours.
            gpus = sum(r.num_workers * r.gpus_per_worker for _, _, r in placements(self.cfg))
            tracker.log_metrics({"compute/gpus": gpus}, step=0)
            self.state["mlflow_run_id"] = tracker.run_id
            yield tracker

    def evaluator(self):
        """The evaluation on the built-in task's test prompts (None without a task): the
        reference's samples are drawn once, here."""
        if self.cfg.data.task is None:
            return None
        from prefopt.eval import Evaluator

        reference = self.start_reference()
        with self.console.status(f"sampling the reference on {self.cfg.eval.num_prompts} test prompts"):
            return Evaluator(self.cfg, self.inputs.tokenizer, reference)

    def sampler(self, policy):
        """Who samples `policy` (rollout.engine): its own ranks, or vLLM engines started here
        (once; shut down with the session) and synced before they sample weights they lack."""
        if "sampler" not in self.state_objects:
            from prefopt.rollout.sampler import make_sampler

            prompts = self.inputs.data.table["prompt_ids"].to_pylist()[: self.cfg.rollout.check_sequences]
            self.state_objects["sampler"] = self.own(make_sampler(
                self.cfg, policy, str(self.inputs.model_dir), self.inputs.tokenizer, prompts, self.console))
        return self.state_objects["sampler"]

    def evaluation(self, evaluator, group):
        """run_steps' `evaluate` for `group` (None without an evaluator), sampled through the
        session's sampler: with vLLM engines, synced with the weights of that step first."""
        if evaluator is None:
            return None
        sampler = self.sampler(group)

        def evaluate(step: int) -> dict[str, float]:
            sampler.updated(step)
            metrics = log_evaluation(evaluator, sampler, step, self.tracker, self.console)
            rollout = sampler.metrics()
            if rollout:  # the sync this evaluation made, if any
                self.tracker.log_metrics(rollout, step=step)
            return metrics

        return evaluate

    def saver(self, *names: str):
        """run_steps' `save`: every rank of each named group saves its part (the first: the
        checkpoint itself; the others: their sub-folders)."""
        def save(step: int) -> None:
            for i, name in enumerate(names):
                stages.save_ranks(self.groups[name], self.run, step, None if i == 0 else name)

        return save

    def train(self, steps, save, evaluate=None, *, loss_ratio_guard: bool = True,
              window: tuple[int, int] | None = None) -> dict[str, float]:
        """The shared loop (stages.run_steps): logging, the health guard, checkpoints, evaluations;
        window (first, end): one round's steps of a multi-round recipe."""
        return stages.run_steps(self.cfg, steps, save, self.run, self.tracker, self.console, self.state, evaluate,
                                loss_ratio_guard=loss_ratio_guard, window=window)

    def finish(self, group, metrics: dict[str, float], name: str = "policy") -> TrainResult:
        """The end of every training: the trained model exported, logged to MLflow, its group shut down."""
        memory = group.call("memory")
        self.tracker.log_metrics({f"memory/{k}": float(v) for k, v in memory[0].items()}, step=self.cfg.train.max_steps)
        lora = self.cfg.model.lora
        # A scalar head (a reward model) is read as a plain directory (reward.model_path): merged always.
        merge = lora is not None and (lora.merge_on_export or self.spec.role(self.cfg, name).head == "scalar")
        model_dir = stages.export(group, self.run, self.console, lora, merge)
        self.stop(name)
        with self.console.status("logging the model to MLflow"):
            # A LoRA run logs its adapter (megabytes), never a merged copy of the base model.
            self.tracker.log_model_dir(model_dir if lora is None else (self.run.store / stages.ADAPTER_DIR).uri)
        return TrainResult(self.run.output_dir, model_dir, metrics, self.cfg.train.max_steps, self.tracker.run_id,
                           self.timings, [info["param_bytes"] for info in self.infos[name]], memory)


class AdaptersOff:
    """The policy's group seen as the reference (ref.mode adapters_off): the same ranks, each call
    made with the LoRA adapters switched off. Offers what evaluation and PPO ask a reference for:
    `split` and `split_async` of generate and score."""

    def __init__(self, policy):
        self.policy = policy

    def split(self, method: str, items: list, *args, **kwargs) -> list:
        return self.policy.split(method, items, *args, adapters=False, **kwargs)

    def split_async(self, method: str, items: list, *args, **kwargs):
        return self.policy.split_async(method, items, *args, adapters=False, **kwargs)


def log_evaluation(evaluator, policy, step: int, tracker, console) -> dict[str, float]:
    from prefopt.tracking.tracker import LIMITS_ARTIFACT, TAG_EVAL_FINGERPRINT, TAG_EVAL_LIMITS

    result = evaluator(policy)
    tracker.set_tags({TAG_EVAL_FINGERPRINT: evaluator.fingerprint})
    if evaluator.limits is not None and not getattr(evaluator, "limits_logged", False):
        tracker.log_dict(evaluator.limits, LIMITS_ARTIFACT)  # prefopt compare draws them
        tracker.set_tags({TAG_EVAL_LIMITS: evaluator.limits["samples_per_prompt"]})
        evaluator.limits_logged = True
    tracker.log_metrics(result.metrics, step=step)
    tracker.log_generations(result.samples, step=step)
    m = result.metrics
    console.print(f"eval at step {step}: reward {m['eval/reward']:.3f} ± {m['eval/reward_se']:.3f} (reference "
                  f"{m['eval/reference_reward']:.3f}), KL to reference {m['eval/kl']:.2f} ± {m['eval/kl_se']:.2f} "
                  f"nats, win rate vs reference {m['eval/win_rate']:.2f} ± {m['eval/win_rate_se']:.2f}")
    return m

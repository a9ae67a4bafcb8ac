"""The stages every controller is built from, each once.

    preflight(cfg, console, ...)                   seconds-long checks before anything starts
    run = open_run(cfg, resume)                    output_dir, the newest complete checkpoint
    inputs = prepare_inputs(cfg, console)          model dir, tokenizer, tokenized data
    connect(cfg)                                   local Ray, or the cluster at cluster.address
    ref = start_reference(cfg, inputs, console)    the reference role's group
    cache = fill_reference_cache(...)              RefCache hit, or computed on `ref`
    policy, infos = start_policy(...)              the policy role's group, built and resumed
    run_steps(cfg, steps_on(policy), saver(policy, run), run, tracker, ...)
                                                   the loop: calls of several steps, logging,
                                                   the health guard, checkpoints, evaluations
    save_ranks(group, run, step, part)             every rank of a group saves its part
    write_state(run, step, state)                  then the marker file: the checkpoint is complete
    export(policy, run)                            a plain Hugging Face directory

A controller (prefopt.algorithms.offline, reward_model, ppo; ReST next) is a loop over these.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from prefopt.config import RunConfig
from prefopt.errors import DIVERGED, UserError
from prefopt.storage import Store, is_remote, local_dir_for, localize, publish

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"


@dataclass
class Run:
    """A run's directory and what it resumes from (checkpoint None: a fresh start).

    `store` is output_dir wherever it lives (a local path, s3://, gs://, ...: prefopt.storage);
    the checkpoints, the export and config.yaml go there. `local_dir` is where this process
    writes metrics.jsonl as it goes: output_dir itself when local, else a folder of this machine
    whose log is copied to the store before each checkpoint's state file."""

    store: Store
    local_dir: Path
    checkpoint: tuple[str, dict] | None  # (tag, state) of the newest complete checkpoint

    @property
    def output_dir(self) -> str:
        return self.store.uri

    def checkpoint_dir(self, tag: str) -> Store:
        return self.store / CHECKPOINTS / tag

    def sync_log(self) -> None:
        """The log up to now onto the store (a local output_dir holds it already)."""
        if not self.store.is_local:
            (self.store / METRICS_FILE).write_bytes((self.local_dir / METRICS_FILE).read_bytes())

    @property
    def start_step(self) -> int:
        return self.checkpoint[1]["step"] if self.checkpoint else 0

    @property
    def mlflow_run_id(self) -> str | None:
        return self.checkpoint[1].get("mlflow_run_id") if self.checkpoint else None

    def check_data(self, data) -> None:
        """A checkpoint trained on other data is not this run's to continue."""
        if self.checkpoint is None:
            return
        tag, state = self.checkpoint
        if state.get("data_fingerprint") not in (None, data.fingerprint):
            raise PreflightError(f"{self.checkpoint_dir(tag)}: the checkpoint was trained on other "
                             f"data (fingerprint {state['data_fingerprint'][:16]}, now {data.fingerprint[:16]}); "
                             "use --fresh or another output_dir")


def complete_checkpoints(store: Store) -> list[tuple[int, str, dict]]:
    """(step, tag, state) of every complete checkpoint (one with a state file, written last), by step."""
    found = []
    for tag in (store / CHECKPOINTS).children():
        if not tag.startswith("step"):
            continue
        try:  # one read per checkpoint (a round trip each on an object store), no existence check first
            state = json.loads((store / CHECKPOINTS / tag / STATE_FILE).read_text())
        except FileNotFoundError:  # being written, or killed while it was
            continue
        found.append((state["step"], tag, state))
    return sorted(found)


def latest_checkpoint(store: Store) -> tuple[str, dict] | None:
    """The newest complete checkpoint, ignoring any half-written one."""
    complete = complete_checkpoints(store)
    return (complete[-1][1], complete[-1][2]) if complete else None


def open_run(cfg: RunConfig, resume: bool | None) -> Run:
    """resume: None = resume when a checkpoint exists; True = must resume; False = start over."""
    store = Store.at(cfg.output_dir)
    local_dir = local_dir_for(store.uri)
    local_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = latest_checkpoint(store)
    if resume is True and checkpoint is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {store / CHECKPOINTS}")
    if resume is False and checkpoint is not None:
        (store / CHECKPOINTS).delete()
        checkpoint = None
    metrics = local_dir / METRICS_FILE
    if checkpoint is None:
        metrics.unlink(missing_ok=True)
    else:
        if not store.is_local:  # the log as of the checkpoint, whatever this machine kept
            log = store / METRICS_FILE
            metrics.write_bytes(log.read_bytes() if log.is_file() else b"")
        if metrics.is_file():  # drop what was logged after the checkpoint: those steps run again
            kept = [line for line in metrics.read_text().splitlines()
                    if json.loads(line)["step"] <= checkpoint[1]["step"]]
            metrics.write_text("".join(line + "\n" for line in kept))
    (store / "config.yaml").write_text(cfg.to_yaml())
    return Run(store, local_dir, checkpoint)


@dataclass
class Inputs:
    """What a run starts from, on this machine, and the addresses its ranks open the same from."""

    model_dir: Path  # the starting model (the policy's, and the reference's unless ref.model_path)
    tokenizer: object
    data: object  # prefopt.data.TokenizedData
    # Set when ranks must open another copy: model.path's own URI, or the copies on an
    # object-store output_dir of what this machine made (tokenized data, the tiny model).
    model_for_ranks: str | None = None
    data_for_ranks: str | None = None

    def reference_dir(self, cfg: RunConfig) -> Path:
        return localize(cfg.ref.model_path) if cfg.ref.model_path else self.model_dir

    def rank_model_dir(self) -> str:
        return self.model_for_ranks or str(self.model_dir)

    def rank_data_path(self) -> str:
        return self.data_for_ranks or str(self.data.path)

    def rank_reference_dir(self, cfg: RunConfig) -> str:
        return cfg.ref.model_path or self.rank_model_dir()


def prepare_inputs(cfg: RunConfig, console) -> Inputs:
    """The opening of every run: model, tokenizer, and the data read, validated and tokenized.

    With output_dir on an object store, what this machine made is uploaded there once, so
    that ranks on other nodes open it from the store (prefopt.storage)."""
    import hashlib

    from prefopt.data import prepare
    from prefopt.models import model_and_tokenizer

    work = local_dir_for(cfg.output_dir)
    with console.status("model and tokenizer"):
        model_dir, tokenizer = model_and_tokenizer(cfg.model, work)
    with console.status("reading, validating and tokenizing the data"):
        data = prepare(cfg, tokenizer, work / "data")
    console.print(f"data: {data.report.summary()}  [dim]fingerprint {data.fingerprint[:16]}[/]")
    inputs = Inputs(model_dir, tokenizer, data, model_for_ranks=cfg.model.path if is_remote(cfg.model.path or "") else None)
    if is_remote(cfg.output_dir):
        store = Store.at(cfg.output_dir)
        with console.status(f"copying the tokenized data to {store.uri}"):
            inputs.data_for_ranks = data_for_ranks(cfg, data)
            if cfg.model.path is None:  # the tiny model, named by the config it was built from
                built_from = hashlib.sha256((model_dir / "prefopt_tiny.json").read_bytes()).hexdigest()[:16]
                inputs.model_for_ranks = publish(model_dir, store / f"tiny-model-{built_from}")
    return inputs


def data_for_ranks(cfg: RunConfig, data) -> str:
    """Where ranks open tokenized data this machine wrote: its path, or its copy on an
    object-store output_dir (uploaded once; named by its fingerprint)."""
    if not is_remote(cfg.output_dir):
        return str(data.path)
    return publish(data.path, Store.at(cfg.output_dir) / "data" / data.path.name)


class PreflightError(UserError, ValueError):
    """A run that cannot start here; the message names the config field to change."""


def _roles(cfg: RunConfig, with_reference: bool, more: tuple[str, ...] = ()) -> list[tuple[str, str, object]]:
    """(name in messages, config section, role config) of the roles a run starts; `more`: "critic",
    "reward" (PPO)."""
    out = [("policy", "policy", cfg.policy)] + ([("reference", "ref", cfg.reference)] if with_reference else [])
    return out + [{"critic": ("critic", "critic", cfg.critic_role), "reward": ("reward", "reward", cfg.reward_role)}[m]
                  for m in more]


def alive_together(cfg: RunConfig, roles: list[tuple[str, str, object]]) -> list[tuple[str, str, object]]:
    """The roles whose ranks live at the same time: all of PPO's; in an offline run a reference
    that only fills the cache (ref.mode cache, no evaluation) is shut down before the policy starts."""
    if cfg.algorithm.name == "ppo" or cfg.ref.mode == "live" or cfg.data.task is not None:
        return roles
    return [r for r in roles if r[0] != "reference"]


def preflight(cfg: RunConfig, console, *, with_reference: bool, tracking: bool = True,
              more: tuple[str, ...] = ()) -> None:
    """What can be checked in seconds, before Ray, data or caches: paths that must exist, the
    dtype on the device, the tracking store, and, for a local instance, whether this machine has
    what the roles ask for (a remote cluster is checked on connect)."""
    import os

    from prefopt.cluster.worker_group import check_fit_together, check_fits

    critic_path = cfg.critic.model_path if "critic" in more else None
    for field, path in (("model.path", cfg.model.path), ("ref.model_path", cfg.ref.model_path),
                        ("critic.model_path", critic_path)):
        if path is not None and not (Store.at(path) / "config.json").is_file():
            raise PreflightError(f"{field}: {path} is not a Hugging Face model directory (no config.json)")
    if is_remote(cfg.output_dir):
        check_writable(Store.at(cfg.output_dir), "output_dir")
    if cfg.data.path is not None and not Path(cfg.data.path).exists() and "://" not in cfg.data.path:
        raise PreflightError(f"data.path: {cfg.data.path} does not exist")
    roles = _roles(cfg, with_reference, more)
    gpu_roles = [key for _, key, role in roles if role.gpus_per_worker]
    if cfg.model.dtype == "float16" and len(gpu_roles) < len(roles):
        raise PreflightError("model.dtype: float16 needs GPUs (DeepSpeed's fp16 mode does not run on CPU ranks); "
                             "use float32 or bfloat16, or give every role gpus_per_worker")
    if tracking:
        from prefopt.tracking.store import check_reachable

        check_reachable(cfg)
    if cfg.cluster.address is None:
        import torch

        cores = os.cpu_count() or 1
        # A local instance shares this machine's cores out as logical CPUs (see ray_setup), so
        # only a single rank asking for more cores than exist is impossible; GPUs are counted.
        here = {"CPU": float("inf"), "GPU": float(torch.cuda.device_count())}
        for name, key, role in roles:
            if role.cpus_per_worker > cores:
                raise PreflightError(f"{name}: {key}.cpus_per_worker={role.cpus_per_worker:g} but this machine "
                                     f"has {cores} cores; lower {key}.cpus_per_worker")
            check_fits(name, key, role, nodes=[here])
        check_fit_together(alive_together(cfg, roles), nodes=[here])
        # Ranks that compute at the same time: the policy's and a live reference's; in PPO the
        # policy and critic updating together, or the reference, critic and reward scoring together.
        def cpus(*role_configs) -> float:
            return sum(role.num_workers * role.cpus_per_worker for role in role_configs)

        busy = cpus(cfg.policy)
        if cfg.algorithm.name == "ppo":
            critic = [cfg.critic_role] if "critic" in more else []
            reward = [cfg.reward_role] if "reward" in more else []
            busy = max(cpus(cfg.policy, *critic), cpus(cfg.reference, *critic, *reward))
        elif with_reference and cfg.ref.mode == "live":
            busy += cpus(cfg.reference)
        if busy > cores:
            console.print(f"[yellow]warning:[/] the ranks that compute together ask for {busy:g} CPUs and this "
                          f"machine has {cores}: they will share cores and each run slower (lower "
                          "policy.num_workers or policy.cpus_per_worker)")


def check_writable(store: Store, field: str) -> None:
    """A store a run will write to takes a small file and gives it back, or the run stops here."""
    import uuid

    from prefopt.storage import check_endpoint

    if store.uri.startswith("s3://"):
        try:
            check_endpoint()
        except OSError as exc:
            raise PreflightError(f"{field}: {store.uri}: {exc}") from None
    probe = store / f".prefopt-probe-{uuid.uuid4().hex}"
    try:
        probe.write_text("probe")
        probe.delete()
    except OSError as exc:
        reason = str(exc).splitlines()[0].removeprefix(f"{probe.uri}: ")
        raise PreflightError(f"{field}: cannot write to {store.uri}: {reason}") from None


def connect(cfg: RunConfig, with_reference: bool, more: tuple[str, ...] = ()) -> None:
    """Start a local Ray or join cluster.address; a remote cluster is checked against the roles."""
    from prefopt.cluster.ray_setup import connect as ray_connect
    from prefopt.cluster.worker_group import check_fit_together, check_fits

    roles = _roles(cfg, with_reference, more)
    ray_connect(cfg.cluster, [role for _, _, role in roles])
    if cfg.cluster.address is not None:
        for name, key, role in roles:
            check_fits(name, key, role)
        check_fit_together(alive_together(cfg, roles))


def start_reference(cfg: RunConfig, inputs: Inputs, console):
    """The reference role: `ref.num_workers` frozen engine workers holding the data."""
    from prefopt.cluster.worker_group import WorkerGroup
    from prefopt.workers.reference import ReferenceWorker

    with console.status(f"starting {cfg.ref.num_workers} reference worker(s)"):
        group = WorkerGroup(ReferenceWorker, cfg.reference, cfg.cluster, name="reference", key="ref",
                            init_args=(cfg.model_dump_json(),))
        try:
            group.call("setup", inputs.rank_reference_dir(cfg), inputs.rank_data_path())
        except BaseException:
            group.shutdown()
            raise
    return group


def start_reward(cfg: RunConfig, console, head: str = "scalar"):
    """The reward role: `reward.num_workers` frozen engine workers holding reward.model_path, a
    scalar head (a reward model) or a causal LM ("lm": a judge)."""
    from prefopt.cluster.worker_group import WorkerGroup
    from prefopt.workers.reward import RewardWorker

    with console.status(f"starting {cfg.reward_role.num_workers} reward worker(s)"):
        group = WorkerGroup(RewardWorker, cfg.reward_role, cfg.cluster, name="reward", key="reward",
                            init_args=(cfg.model_dump_json(),))
        try:
            group.call("build", cfg.reward.model_path, train=False, head=head)
        except BaseException:
            group.shutdown()
            raise
    return group


def start_policy(cfg: RunConfig, inputs: Inputs, run: Run, console, *, ref_cache=None, reference=None,
                 worker_cls=None, **setup_kwargs):
    """The trained model's role (the `policy` section): built, its data and reference attached,
    resumed from the run's checkpoint. worker_cls: PolicyWorker, or another role trained the
    same way (RewardModelWorker). -> (group, setup info of each rank)."""
    from prefopt.cluster.worker_group import WorkerGroup
    from prefopt.workers.policy import PolicyWorker

    worker_cls = worker_cls or PolicyWorker
    with console.status(f"starting {cfg.policy.num_workers} policy worker(s)"):
        group = WorkerGroup(worker_cls, cfg.policy, cfg.cluster, name="policy", key="policy",
                            init_args=(cfg.model_dump_json(),))
    try:
        if worker_cls is PolicyWorker:
            live = reference.actors if reference is not None and cfg.ref.mode == "live" else None
            setup_kwargs |= {"ref_cache": ref_cache, "ref_actors": live}
        infos = group.call("setup", inputs.rank_model_dir(), inputs.rank_data_path(), **setup_kwargs)
        stage = infos[0]["zero_stage"]
        asked = cfg.policy.deepspeed.zero_stage
        why = "" if stage == asked else f" ({asked} asked: one rank has nothing to partition)"
        console.print(f"policy: {group.size} rank(s), ZeRO stage {stage}{why}, "
                      f"{infos[0]['param_bytes'] / 2**20:.2f} MiB of parameters on rank 0")
        if run.checkpoint is not None:
            tag, _ = run.checkpoint
            group.call("load_checkpoint", *checkpoint_location(run, run.start_step))
            console.print(f"resumed from {run.checkpoint_dir(tag)} at step {run.start_step}")
    except BaseException:
        group.shutdown()
        raise
    return group, infos


def intervals(start: int, end: int, every: list[int | None]) -> list[tuple[int, int]]:
    """Steps start..end-1 cut into (first step, count) runs that end at each multiple of the
    periods in `every` (logging, saving, evaluating) and at `end`: one call per run."""
    cuts = {end}
    for period in every:
        if period:
            cuts.update(range(period, end, period))
    out, at = [], start
    for cut in sorted(c for c in cuts if c > start):
        out.append((at, cut - at))
        at = cut
    return out


class TrainingDiverged(UserError):
    """The health guard stopped the run; the message names the last good checkpoint."""

    exit_code = DIVERGED


class HealthGuard:
    """Stops a run whose loss or gradients went non-finite, or whose loss stayed above
    `max_loss_ratio` times its first step's value for `patience` steps (train.health).

    `check` runs on each step's metrics before the step's checkpoint is written, so a diverged
    state is never saved; `first_loss` travels in the checkpoint state, so a resumed run keeps
    the same yardstick."""

    def __init__(self, health, run: Run, loss_ratio: bool = True):
        self.health, self.run, self.loss_ratio = health, run, loss_ratio
        self.first_loss: float | None = run.checkpoint[1].get("first_loss") if run.checkpoint else None
        self.streak_start: int | None = None  # first step of the current run of high losses

    def check(self, step: int, metrics: dict[str, float]) -> None:
        import math

        if not self.health.enabled:
            return
        loss, grad_norm = metrics.get("loss", 0.0), metrics.get("grad_norm", 0.0)
        if self.first_loss is None:
            self.first_loss = loss
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self._stop(step, step, f"the loss ({loss}) or the gradient norm ({grad_norm}) is not finite")
        limit = self.health.max_loss_ratio * abs(self.first_loss)
        if not self.loss_ratio or loss <= limit or self.first_loss <= 0:
            self.streak_start = None
            return
        self.streak_start = step if self.streak_start is None else self.streak_start
        if step - self.streak_start + 1 >= self.health.patience:
            self._stop(step, self.streak_start,
                       f"the loss ({loss:.4g}) has stayed above {self.health.max_loss_ratio:g} x its first value "
                       f"({self.first_loss:.4g}) for {self.health.patience} steps (train.health.max_loss_ratio, "
                       "train.health.patience)")

    def _stop(self, step: int, since: int, what: str) -> None:
        good = [(s, tag) for s, tag in self._checkpoints() if s < since]
        last = (f"the last good checkpoint is {self.run.checkpoint_dir(good[-1][1])} (step {good[-1][0]}): "
                "lower train.lr or set policy.deepspeed.gradient_clipping, then train again with --resume"
                if good else "no checkpoint was saved before it: lower train.lr or set "
                "policy.deepspeed.gradient_clipping and start again")
        raise TrainingDiverged(f"training stopped by the health guard at step {step}: {what}; {last} "
                               "(train.health.enabled: false turns the guard off)")

    def _checkpoints(self) -> list[tuple[int, str]]:
        return [(step, tag) for step, tag, _ in complete_checkpoints(self.run.store)]


def run_steps(cfg: RunConfig, steps, save, run: Run, tracker, console, state: dict, evaluate=None,
              loss_ratio_guard: bool = True) -> dict[str, float]:
    """The training loop of every controller: `steps(first, count) -> [metrics of each step]`
    in calls cut at logging, saving and evaluation points (steps_on(group): workers that have
    `train_steps`; PPO: its iterations); each step's metrics to metrics.jsonl and (every
    train.log_steps) to MLflow; the health guard on every step before the checkpoint
    (loss_ratio_guard=False: only non-finite values stop, for losses that may sit near zero or
    below it); `save(step)` then the state file; `evaluate(step) -> metrics` at step 0 of a fresh
    run (where the reward-KL curve starts: the policy is the reference), every eval.every_steps
    and at the end. -> the last step's metrics."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    t = cfg.train
    eval_every = cfg.eval.every_steps if evaluate is not None else None
    guard = HealthGuard(t.health, run, loss_ratio_guard)
    # A resumed run replays the steps after its checkpoint; MLflow already holds those it logged
    # before the kill, with the same values (resume is exact): log each step once.
    logged_until = tracker.last_step("loss") if run.checkpoint is not None else 0
    metrics: dict[str, float] = {}
    if evaluate is not None and run.start_step == 0:
        evaluate(0)
    columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=console) as progress, (run.local_dir / METRICS_FILE).open("a") as log_file:
        bar = progress.add_task("train", total=t.max_steps, completed=run.start_step, info="")
        for first, count in intervals(run.start_step, t.max_steps, [t.log_steps, t.save_steps, eval_every]):
            t0 = time.perf_counter()
            per_step = steps(first, count)
            # The call is what the controller can time: its tokens over its wall time.
            rate = sum(m["tokens"] for m in per_step) / max(time.perf_counter() - t0, 1e-9)
            for step, metrics in enumerate(per_step, start=first + 1):
                metrics["tokens_per_second"] = rate
                log_file.write(json.dumps({"step": step, **metrics}) + "\n")
                if (step % t.log_steps == 0 or step == t.max_steps) and step > logged_until:
                    tracker.log_metrics(metrics, step=step)
                log_file.flush()
                guard.check(step, metrics)  # before this call's checkpoint: a diverged state is never saved
            state["first_loss"] = guard.first_loss
            done = first + count
            acc = metrics.get("rewards/accuracies", metrics.get("rm/accuracy"))
            info = f"loss {metrics['loss']:.4f}" + (f"  acc {acc:.2f}" if acc is not None else "")
            info += f"  reward {metrics['ppo/reward']:.3f}  kl {metrics['ppo/kl']:.2f}" if "ppo/reward" in metrics else ""
            info += f"  {metrics['tokens_per_second']:.0f} tok/s"
            progress.update(bar, completed=done, info=info)
            if done % t.save_steps == 0 or done == t.max_steps:
                # An 8B checkpoint going up to an object store takes minutes: say what is happening.
                progress.update(bar, info=f"{info}  [dim]saving {run.checkpoint_dir(f'step{done}')}[/]")
                save(done)
                write_state(run, done, state)
                progress.update(bar, info=info)
            if evaluate is not None and ((eval_every and done % eval_every == 0) or done == t.max_steps):
                metrics |= evaluate(done)
    return metrics


def steps_on(group):
    """run_steps' `steps` for a group whose workers train themselves (`train_steps(first, count)`)."""
    def steps(first: int, count: int) -> list[dict[str, float]]:
        # [ranks][steps] -> one dict per step
        return [combine_ranks(list(ranks)) for ranks in zip(*group.call("train_steps", first, count), strict=True)]

    return steps


def combine_ranks(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """One step's metrics from every rank's: means, tokens summed, the slowest rank's seconds."""
    from prefopt.workers.offline_step import mean_metrics

    out = mean_metrics(per_rank)
    out["tokens"] = float(sum(m["tokens"] for m in per_rank))
    out["step_seconds"] = max(m["step_seconds"] for m in per_rank)
    return out


def checkpoint_location(run: Run, step: int, part: str | None = None) -> tuple[str, str]:
    """(directory, tag) of a group's checkpoint: the policy's is checkpoints/step<N>; another
    model of the same run (PPO's critic) saves its `part` inside it, checkpoints/step<N>/<part>."""
    tag = f"step{step}"
    return ((run.store / CHECKPOINTS).uri, tag) if part is None else (run.checkpoint_dir(tag).uri, part)


def save_ranks(group, run: Run, step: int, part: str | None = None) -> None:
    group.call("save_checkpoint", *checkpoint_location(run, step, part), {"step": step})


def saver(group, run: Run):
    """run_steps' `save` for a run with one trained group."""
    return lambda step: save_ranks(group, run, step)


def write_state(run: Run, step: int, state: dict) -> None:
    # Written after every rank of every group has saved, and after the log: a state file means
    # the checkpoint is complete.
    run.sync_log()
    (run.checkpoint_dir(f"step{step}") / STATE_FILE).write_text(json.dumps({"step": step, **state}))


def export(group, run: Run, console) -> str:
    """The policy as a plain Hugging Face directory, output_dir/model. -> its path or URI."""
    export_dir = run.store / "model"
    with console.status("exporting the policy"):
        group.call("export", export_dir.uri)
    run.sync_log()
    console.print(f"exported policy to [bold]{export_dir}[/]")
    return export_dir.uri

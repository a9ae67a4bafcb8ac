"""The stages every controller is built from, each once; a Session (session.py) calls them.

    preflight(cfg, console)                        seconds-long checks before anything starts
    run = open_run(cfg, resume)                    output_dir, the newest complete checkpoint (checkpoints.py)
    inputs = prepare_inputs(cfg, console)          model dir, tokenizer, tokenized data
    connect(cfg)                                   local Ray, or the cluster at cluster.address
    group, infos = start_group(cfg, role, ...)     a role's ranks, set up
    cache = fill_reference_cache(...)              RefCache hit, or computed on the reference (precompute_ref.py)
    run_steps(cfg, steps_on(policy), save, run, tracker, ...)
                                                   the loop: calls of several steps, logging,
                                                   the health guard, checkpoints, evaluations
    save_ranks(group, run, step, part)             every rank of a group saves its part
    write_state(run, step, state)                  then the marker file: the checkpoint is complete
    export(policy, run)                            a plain Hugging Face directory

Which roles a run has is the algorithm spec's to say (prefopt.algorithm_spec), never a stage's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from prefopt.algorithms.checkpoints import (  # noqa: F401
    CHECKPOINTS,
    METRICS_FILE,
    STATE_FILE,
    PreflightError,
    Run,
    checkpoint_location,
    complete_checkpoints,
    latest_checkpoint,
    open_run,
    save_ranks,
    saver,
    write_state,
)
from prefopt.config import RunConfig
from prefopt.errors import DIVERGED, UserError
from prefopt.storage import Store, is_remote, local_dir_for, localize, publish


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
    from prefopt.data.prepare import progress_bar
    from prefopt.models import model_and_tokenizer

    work = local_dir_for(cfg.output_dir)
    with console.status("model and tokenizer"):
        model_dir, tokenizer = model_and_tokenizer(cfg.model, work)
    with progress_bar(console, "reading, validating and tokenizing the data") as progress:
        data = prepare(cfg, tokenizer, work / "data", progress)
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


def _placements(cfg: RunConfig, roles) -> list:
    """(name, section, RoleConfig) of `roles` (prefopt.algorithm_spec.Role), by default every
    role the algorithm starts."""
    from prefopt.algorithm_spec import placements

    placed = placements(cfg, roles)
    if cfg.rollout.engine == "vllm" and any(name == "policy" for name, _, _ in placed):  # engines sample the policy
        placed.append(("rollout", "rollout", cfg.rollout.as_role(on_gpus=cfg.policy.gpus_per_worker > 0)))
    return placed


def preflight(cfg: RunConfig, console, *, roles=None, tracking: bool = True) -> None:
    """What can be checked in seconds, before Ray, data or caches: paths that must exist, the
    dtype on the device, the tracking store, and, for a local instance, whether this machine has
    what the roles ask for (a remote cluster is checked on connect). roles: the
    prefopt.algorithm_spec.Role list a run starts (default: the algorithm's spec)."""
    import os

    from prefopt.algorithm_spec import busy_cpus
    from prefopt.cluster.worker_group import check_fit_together, check_fits
    from prefopt.models.model_dir import model_config

    placed = _placements(cfg, roles)
    critic_path = cfg.critic.model_path if any(name == "critic" for name, _, _ in placed) else None
    for field, path in (("model.path", cfg.model.path), ("ref.model_path", cfg.ref.model_path),
                        ("critic.model_path", critic_path)):
        if path is not None:
            model_config(path, field, PreflightError)
    if is_remote(cfg.output_dir):
        check_writable(Store.at(cfg.output_dir), "output_dir")
    if cfg.data.path is not None and not Path(cfg.data.path).exists() and "://" not in cfg.data.path:
        raise PreflightError(f"data.path: {cfg.data.path} does not exist")
    gpu_roles = [key for _, key, role in placed if role.gpus_per_worker]
    if cfg.model.dtype == "float16" and len(gpu_roles) < len(placed):
        raise PreflightError("model.dtype: float16 needs GPUs (DeepSpeed's fp16 mode does not run on CPU ranks); "
                             "use float32 or bfloat16, or give every role gpus_per_worker")
    if cfg.rollout.engine == "vllm":
        from prefopt.rollout.sampler import check_environment

        check_environment(cfg, on_gpus=cfg.policy.gpus_per_worker > 0)
    if tracking:
        from prefopt.tracking.store import check_reachable

        check_reachable(cfg)
    if cfg.cluster.address is None:
        import torch

        cores = os.cpu_count() or 1
        # A local instance shares this machine's cores out as logical CPUs (see ray_setup), so
        # only a single rank asking for more cores than exist is impossible; GPUs are counted.
        here = {"CPU": float("inf"), "GPU": float(torch.cuda.device_count())}
        for name, key, role in placed:
            if role.cpus_per_worker > cores:
                raise PreflightError(f"{name}: {key}.cpus_per_worker={role.cpus_per_worker:g} but this machine "
                                     f"has {cores} cores; lower {key}.cpus_per_worker")
            check_fits(name, key, role, nodes=[here])
        check_fit_together(together(cfg, placed), nodes=[here])
        busy = busy_cpus(cfg) if roles is None else cpus_of(placed)
        if busy > cores:
            console.print(f"[yellow]warning:[/] the ranks that compute together ask for {busy:g} CPUs and this "
                          f"machine has {cores}: they will share cores and each run slower (lower "
                          "policy.num_workers or policy.cpus_per_worker)")


def cpus_of(placed: list) -> float:
    return sum(role.num_workers * role.cpus_per_worker for _, _, role in placed)


def together(cfg: RunConfig, placed: list) -> list:
    """The placements among `placed` whose ranks live at the same time (prefopt.algorithm_spec)."""
    from prefopt.algorithm_spec import spec_for

    alive = {r.name for r in spec_for(cfg).alive_together(cfg)}
    return [p for p in placed if p[0] in alive or p[0] not in {r.name for r in spec_for(cfg).roles(cfg)}]


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


def connect(cfg: RunConfig, *, roles=None) -> None:
    """Start a local Ray (sized for `roles`, by default the algorithm's) or join cluster.address;
    a remote cluster is checked against the roles."""
    from prefopt.cluster.ray_setup import connect as ray_connect
    from prefopt.cluster.worker_group import check_fit_together, check_fits

    placed = _placements(cfg, roles)
    ray_connect(cfg.cluster, [role for _, _, role in placed])
    if cfg.cluster.address is not None:
        for name, key, role in placed:
            check_fits(name, key, role)
        check_fit_together(together(cfg, placed))


def start_group(cfg: RunConfig, role: str, console, worker_cls, setup: str, *args, **kwargs):
    """A role's ranks started and `setup(*args, **kwargs)` called on every one (shut down again if
    that fails). -> (group, what each rank's setup returned)."""
    from prefopt.algorithm_spec import SECTIONS, role_config
    from prefopt.cluster.worker_group import WorkerGroup

    role_cfg = role_config(cfg, role)
    with console.status(f"starting {role_cfg.num_workers} {role} worker(s)"):
        group = WorkerGroup(worker_cls, role_cfg, cfg.cluster, name=role, key=SECTIONS[role],
                            init_args=(cfg.model_dump_json(),))
        try:
            infos = group.call(setup, *args, **kwargs)
        except BaseException:
            group.shutdown()
            raise
    return group, infos


def start_reference(cfg: RunConfig, inputs: Inputs, console):
    """The reference role: `ref.num_workers` frozen engine workers holding the data."""
    from prefopt.workers.reference import ReferenceWorker

    return start_group(cfg, "reference", console, ReferenceWorker, "setup", inputs.rank_reference_dir(cfg),
                       inputs.rank_data_path())[0]


def start_reward(cfg: RunConfig, console, head: str = "scalar"):
    """The reward role: `reward.num_workers` frozen engine workers holding reward.model_path, a
    scalar head (a reward model) or a causal LM ("lm": a judge)."""
    from prefopt.workers.reward import RewardWorker

    return start_group(cfg, "reward", console, RewardWorker, "build", cfg.reward.model_path, train=False,
                       head=head)[0]


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
              loss_ratio_guard: bool = True, window: tuple[int, int] | None = None) -> dict[str, float]:
    """The training loop of every controller: `steps(first, count) -> [metrics of each step]`
    in calls cut at logging, saving and evaluation points (steps_on(group): workers that have
    `train_steps`; PPO: its iterations); each step's metrics to metrics.jsonl and (every
    train.log_steps) to MLflow; the health guard on every step before the checkpoint
    (loss_ratio_guard=False: only non-finite values stop, for losses that may sit near zero or
    below it); `save(step)` then the state file; `evaluate(step) -> metrics` at step 0 of a fresh
    run (where the reward-KL curve starts: the policy is the reference), every eval.every_steps
    and at the end. window (first, end): only steps first..end-1 of the run, saved and evaluated
    at `end` (a round of prefopt.algorithms.rounds); steps before a resumed checkpoint are skipped.
    -> the last step's metrics."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from prefopt.algorithm_spec import spec_for

    progress_line = spec_for(cfg).progress
    t = cfg.train
    eval_every = cfg.eval.every_steps if evaluate is not None else None
    guard = HealthGuard(t.health, run, loss_ratio_guard)
    # A resumed run replays the steps after its checkpoint; MLflow already holds those it logged
    # before the kill, with the same values (resume is exact): log each step once.
    logged_until = tracker.last_step("loss") if run.checkpoint is not None else 0
    metrics: dict[str, float] = {}
    if run.checkpoint is not None:
        state.setdefault("tokens_total", run.checkpoint[1].get("tokens_total", 0.0))
    begin, end = window or (0, t.max_steps)
    begin = max(begin, run.start_step)
    if evaluate is not None and begin == 0:
        evaluate(0)
    columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=console) as progress, (run.local_dir / METRICS_FILE).open("a") as log_file:
        bar = progress.add_task("train", total=t.max_steps, completed=begin, info="")
        for first, count in intervals(begin, end, [t.log_steps, t.save_steps, eval_every]):
            t0 = time.perf_counter()
            per_step = steps(first, count)
            # The call is what the controller can time: its tokens over its wall time.
            rate = sum(m["tokens"] for m in per_step) / max(time.perf_counter() - t0, 1e-9)
            for step, metrics in enumerate(per_step, start=first + 1):
                metrics["tokens_per_second"] = rate
                # The compute the run has used so far (it travels in the checkpoint's state), so
                # that methods can be compared at equal cost too.
                state["tokens_total"] = state.get("tokens_total", 0.0) + metrics["tokens"]
                metrics["compute/tokens"] = state["tokens_total"]
                log_file.write(json.dumps({"step": step, **metrics}) + "\n")
                if (step % t.log_steps == 0 or step == t.max_steps) and step > logged_until:
                    tracker.log_metrics(metrics, step=step)
                log_file.flush()
                guard.check(step, metrics)  # before this call's checkpoint: a diverged state is never saved
            state["first_loss"] = guard.first_loss
            done = first + count
            info = progress_line(metrics)
            progress.update(bar, completed=done, info=info)
            if done % t.save_steps == 0 or done == end:
                # An 8B checkpoint going up to an object store takes minutes: say what is happening.
                progress.update(bar, info=f"{info}  [dim]saving {run.checkpoint_dir(f'step{done}')}[/]")
                save(done)
                write_state(run, done, state)
                progress.update(bar, info=info)
            if evaluate is not None and ((eval_every and done % eval_every == 0) or done == end):
                metrics |= evaluate(done)
    if evaluate is not None and begin == end and tracker.last_step("eval/kl") < end:
        metrics = evaluate(end)  # killed after the last checkpoint, before the last evaluation
    return metrics


def steps_on(group):
    """run_steps' `steps` for a group whose workers train themselves (`train_steps(first, count)`)."""
    def steps(first: int, count: int) -> list[dict[str, float]]:
        # [ranks][steps] -> one dict per step
        return [combine_ranks(list(ranks)) for ranks in zip(*group.call("train_steps", first, count), strict=True)]

    return steps


def combine_ranks(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """One step's metrics from every rank's: means, tokens summed, the slowest rank's seconds."""
    from prefopt.workers.trainer import mean_metrics

    out = mean_metrics(per_rank)
    out["tokens"] = float(sum(m["tokens"] for m in per_rank))
    out["step_seconds"] = max(m["step_seconds"] for m in per_rank)
    return out


def export(group, run: Run, console, lora=None, merge: bool = False) -> str:
    """The policy as a plain Hugging Face directory, output_dir/model. -> its path or URI.

    With LoRA (model.lora): peft's adapter directory, output_dir/adapter, and with merge the
    merged model at output_dir/model; -> the merged one if written."""
    export_dir = run.store / "model"
    if lora is None:
        with console.status("exporting the policy"):
            group.call("export", export_dir.uri)
    else:
        adapter_dir = run.store / ADAPTER_DIR
        merged = export_dir.uri if merge else None
        with console.status("exporting the adapter" + (" and the merged model" if merged else "")):
            group.call("export", adapter_dir.uri, merged)
        export_dir = export_dir if merged else adapter_dir
    run.sync_log()
    console.print(f"exported policy to [bold]{export_dir}[/]")
    return export_dir.uri


ADAPTER_DIR = "adapter"  # output_dir/adapter: a LoRA run's adapters, loadable with peft

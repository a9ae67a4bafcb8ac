"""Run a sweep on Ray Tune: every trial queued, run as far side by side as the cluster allows,
resumed when the sweep is started again; one MLflow parent run above the trials' runs.

    result = run_sweep(sweep, console)     -> SweepResult (each trial's end, the scheduling efficiency)

What is the truth about a trial lives in its own output_dir, not in Tune: its checkpoints (a
trial started again resumes from them, as `prefopt train` does) and `sweep-trial.json`, written
when it ends (a finished trial is skipped). So the same command, after a finished sweep, a
Ctrl-C or a kill -9 of this driver, runs only what is left; Tune's own experiment state is
only the record of one invocation (under <output_dir>/tune).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

from ray import tune

from prefopt.errors import UserError
from prefopt.sweep.spec import TRIAL_STATUS, Sweep, SweepError, Trial

SWEEP_STATE = "sweep.json"  # in the sweep's output_dir: the parent MLflow run's id


@dataclass
class TrialEnd:
    id: str
    status: str  # finished | failed | skipped (finished by an earlier invocation) | interrupted
    seconds: float = 0.0  # the trial's own wall time, this invocation (0 when skipped)
    error: str | None = None
    final_metrics: dict = field(default_factory=dict)


@dataclass
class SweepResult:
    trials: list[TrialEnd]
    wall_seconds: float  # from the first trial queued to the last one ended
    concurrency: int  # how many of the largest trial the cluster holds at once (or --max-concurrent)
    parent_run_id: str

    @property
    def failed(self) -> list[TrialEnd]:
        return [t for t in self.trials if t.status == "failed"]

    @property
    def interrupted(self) -> list[TrialEnd]:
        return [t for t in self.trials if t.status == "interrupted"]

    @property
    def efficiency(self) -> float | None:
        """The sum of the trials' own times over (wall time x concurrency): 1.0 when the cluster
        never sat idle between trials (None when nothing ran)."""
        ran = sum(t.seconds for t in self.trials if t.status != "skipped")
        return ran / (self.wall_seconds * self.concurrency) if ran and self.wall_seconds > 0 else None


class SweepFailed(UserError):
    """Some trials failed (each named in the summary); the others ran to their end."""

    exit_code = 6


def run_sweep(sweep: Sweep, console) -> SweepResult:
    from prefopt.storage import Store

    runnable = sweep.valid_trials()
    if not runnable:
        first = sweep.trials[0]
        raise SweepError(f"no trial of the sweep has a valid config; {first.error}")
    store = Store.at(sweep.output_dir)
    ends = {t.id: TrialEnd(t.id, "failed", error=t.error) for t in sweep.trials if t.config is None}
    for trial in runnable:
        done = _status(store / trial.id / TRIAL_STATUS)
        if done.get("status") == "finished":
            ends[trial.id] = TrialEnd(trial.id, "skipped", final_metrics=done.get("final_metrics", {}))
    todo = [t for t in runnable if t.id not in ends]
    concurrency = _connect(sweep, runnable, ends, console)
    todo = [t for t in todo if t.id not in ends]  # the cluster could never hold some
    parent = _parent_run(sweep, store)
    console.print(f"sweep {sweep.name}: {len(sweep.trials)} trials ({len(todo)} to run, "
                  f"{sum(e.status == 'skipped' for e in ends.values())} finished before, "
                  f"{sum(e.status == 'failed' for e in ends.values())} invalid), up to {concurrency} at once; "
                  f"trials in {sweep.output_dir}")
    t0 = time.perf_counter()
    try:
        _prepare(sweep, parent, console)
        t0 = time.perf_counter()  # the scheduling efficiency is the trials'
        if todo:
            _tune(sweep, todo, parent, concurrency, console)
    except BaseException as exc:
        parent.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    wall = time.perf_counter() - t0
    for trial in todo:
        done = _status(store / trial.id / TRIAL_STATUS)
        # Stopped before it could say (Ctrl-C, a lost node): the same command resumes it.
        end = TrialEnd(trial.id, "interrupted")
        if done.get("status") in ("finished", "failed"):
            end = TrialEnd(trial.id, done["status"], done.get("seconds", 0.0), done.get("error"),
                           done.get("final_metrics", {}))
        ends[trial.id] = end
    result = SweepResult([ends[t.id] for t in sweep.trials], wall, concurrency, parent.run_id)
    parent.log_metrics({"sweep/trials_finished": sum(t.status in ("finished", "skipped") for t in result.trials),
                        "sweep/trials_failed": len(result.failed), "sweep/wall_seconds": wall,
                        **({"sweep/scheduling_efficiency": result.efficiency} if result.efficiency else {})}, step=0)
    parent.finish("FAILED" if result.failed else "KILLED" if result.interrupted else "FINISHED")
    return result


def _status(store) -> dict:
    try:
        return json.loads(store.read_text()) if store.exists() else {}
    except (OSError, ValueError):
        return {}


# ----------------------------------------------------------------------------- the cluster


def _connect(sweep: Sweep, runnable: list[Trial], ends: dict, console) -> int:
    """Ray started (local: sized for the largest trial) or joined; a trial no node set could
    ever hold fails now, alone, rather than wait in the queue forever. -> the concurrency."""
    from prefopt.algorithm_spec import placements, spec_for, trial_bundles
    from prefopt.cluster.ray_setup import connect
    from prefopt.cluster.worker_group import ClusterError, check_fit_together, check_fits, cluster_nodes

    addresses = {t.config.cluster.address for t in runnable}
    if len(addresses) > 1:
        raise SweepError(f"{sweep.source}: trials name different clusters ({sorted(map(str, addresses))}); "
                         "a sweep runs on one (cluster.address)")
    largest = max(runnable, key=lambda t: _cpus(trial_bundles(t.config)[0]))
    together = [role.config(largest.config) for role in spec_for(largest.config).alive_together(largest.config)]
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"  # trials read paths relative to where the sweep started
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # Tune's own reporter (verbose=0) stays quiet: ours is the table
    connect(largest.config.cluster, together, log_to_driver=False)
    nodes = cluster_nodes()
    for trial in runnable:
        try:
            placed = placements(trial.config, spec_for(trial.config).alive_together(trial.config))
            for name, key, role in placed:
                check_fits(name, key, role, nodes)
            check_fit_together(placed, nodes)
        except ClusterError as exc:
            ends[trial.id] = TrialEnd(trial.id, "failed", error=str(exc))
    total = {r: sum(n.get(r, 0.0) for n in nodes) for r in ("CPU", "GPU")}
    need = {r: sum(b.get(r, 0.0) for b in trial_bundles(largest.config)[0]) for r in ("CPU", "GPU")}
    fits = min(int(total[r] // need[r]) for r in need if need[r]) or 1
    return max(1, min(fits, sweep.max_concurrent or fits, len(runnable)))


def _cpus(bundles: list[dict]) -> float:
    return sum(b.get("CPU", 0.0) + 1000 * b.get("GPU", 0.0) for b in bundles)


# ----------------------------------------------------------------------------- prepare


STAGE_DONE = "sweep-stage.json"  # in a prepare stage's output_dir once it has run to its end


def _prepare(sweep: Sweep, parent, console) -> None:
    """The sweep file's prepare stages, in order, on this driver (each resumable, as its command
    is): the SFT model, samples, pairs, a reward model that trials start from. A stage that ran
    to its end is skipped; its runs are nested under the parent run, tagged with the stage."""
    from prefopt.storage import Store
    from prefopt.tracking.tracker import TAG_PARENT_RUN, TAG_SWEEP_STAGE

    for stage in sweep.prepare:
        done = Store.at(stage.config.output_dir) / STAGE_DONE
        if done.exists():
            console.print(f"prepare {stage.name}: done before ({stage.config.output_dir})")
            continue
        console.rule(f"prepare {stage.name}: prefopt {stage.command} -> {stage.config.output_dir}")
        tags = stage.config.tracking.tags | {TAG_PARENT_RUN: parent.run_id, TAG_SWEEP_STAGE: stage.name}
        cfg = stage.config.model_copy(update={"tracking": stage.config.tracking.model_copy(update={"tags": tags})})
        _run_stage(stage.command, cfg, console)
        done.write_text(json.dumps({"stage": stage.name, "command": stage.command}))


def _run_stage(command: str, cfg, console) -> None:
    if command == "train":
        from prefopt.algorithms import train

        train(cfg, console, resume=None)
    elif command == "generate":
        from prefopt.algorithms.generate import run

        run(cfg, console)
    else:
        from prefopt.algorithms.label import run

        run(cfg, console)


# ----------------------------------------------------------------------------- MLflow


def _parent_run(sweep: Sweep, store):
    """The sweep's parent run: the one an earlier invocation opened (its id in sweep.json), or a
    new one with the grid and seeds as params."""
    from mlflow.entities import Param

    from prefopt.tracking.store import get_or_create_experiment, mlflow_client
    from prefopt.tracking.tracker import TAG_SWEEP, TAG_SWEEP_PARENT

    client = mlflow_client(sweep.tracking_uri)
    state = _status(store / SWEEP_STATE)
    run_id = state.get("parent_run_id")
    if run_id is not None:
        try:
            if client.get_run(run_id).info.lifecycle_stage != "active":
                run_id = None
        except Exception:  # gone from the store (another tracking.uri): open a new one
            run_id = None
    if run_id is None:
        experiment_id = get_or_create_experiment(client, sweep.experiment, sweep.tracking_uri)
        run_id = client.create_run(experiment_id, run_name=f"sweep-{sweep.name}",
                                   tags={TAG_SWEEP: sweep.id, TAG_SWEEP_PARENT: "true"}).info.run_id
        params = [Param(k, v[:6000]) for k, v in sweep.params().items()]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i:i + 100])
        (store / SWEEP_STATE).write_text(json.dumps({"parent_run_id": run_id, "sweep": sweep.id}))
    else:
        client.update_run(run_id, status="RUNNING")
    return ParentRun(client, run_id)


@dataclass
class ParentRun:
    client: object
    run_id: str

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, key, float(value), step=step)

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


def _trial_tags(sweep: Sweep, trial: Trial, parent_run_id: str) -> dict[str, str]:
    from prefopt.tracking.tracker import (
        TAG_PARENT_RUN,
        TAG_SWEEP,
        TAG_SWEEP_METHOD,
        TAG_SWEEP_POINT,
        TAG_SWEEP_SEED,
        TAG_SWEEP_TRIAL,
    )

    return {TAG_PARENT_RUN: parent_run_id, TAG_SWEEP: sweep.id, TAG_SWEEP_TRIAL: trial.id,
            TAG_SWEEP_METHOD: trial.method, TAG_SWEEP_POINT: json.dumps(trial.point), TAG_SWEEP_SEED: str(trial.seed)}


def _forget_unfinished_runs(sweep: Sweep, trial: Trial, parent) -> None:
    """A trial that starts from step 0 again (no complete checkpoint) replaces the MLflow run an
    earlier attempt left unfinished, so that each trial is one run under the parent."""
    from prefopt.algorithms.checkpoints import complete_checkpoints
    from prefopt.storage import Store
    from prefopt.tracking.tracker import TAG_SWEEP, TAG_SWEEP_TRIAL

    if complete_checkpoints(Store.at(trial.config.output_dir)):
        return
    experiment_id = parent.client.get_run(parent.run_id).info.experiment_id
    earlier = parent.client.search_runs(
        [experiment_id], filter_string=f"tags.`{TAG_SWEEP}` = '{sweep.id}' and tags.`{TAG_SWEEP_TRIAL}` = '{trial.id}'")
    for run in earlier:
        parent.client.delete_run(run.info.run_id)


# ----------------------------------------------------------------------------- Tune


def _tune(sweep: Sweep, todo: list[Trial], parent, concurrency: int, console) -> None:
    from pathlib import Path

    from prefopt.storage import local_dir_for
    from prefopt.sweep.trial import resources, run_trial

    params = []
    for trial in todo:
        trial.tree.setdefault("tracking", {})["tags"] = _trial_tags(sweep, trial, parent.run_id)
        _forget_unfinished_runs(sweep, trial, parent)
        params.append(trial.to_json())
    strategy = todo[0].config.cluster.placement_strategy
    for name in ("ray.tune", "ray.train", "ray.air"):  # the summary names failed trials in one line each
        logging.getLogger(name).setLevel(logging.CRITICAL)
    table = ProgressTable(todo, console)
    tuner = tune.Tuner(
        tune.with_resources(run_trial, resources),
        param_space={"trial": tune.grid_search(params), "strategy": strategy},
        # A local Ray shares this machine's cores as logical CPUs: no more trials than the largest
        # fits, or small trials would crowd the cores. A cluster's Tune packs trials by their bundles.
        tune_config=tune.TuneConfig(reuse_actors=False, max_concurrent_trials=(
            concurrency if todo[0].config.cluster.address is None else sweep.max_concurrent)),
        run_config=tune.RunConfig(
            name=f"{sweep.id}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(Path(local_dir_for(sweep.output_dir), "tune").resolve()),
            callbacks=[table], verbose=0, failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    with table.live():
        tuner.fit()


class ProgressTable(tune.Callback):
    """A Tune callback: the live table of trials (state, step, eval/reward, eval/kl), and one
    line per trial that starts, ends or fails."""

    def __init__(self, trials: list[Trial], console):
        self.console = console
        self.rows = {t.id: {"state": "queued", "max_steps": t.config.train.max_steps} for t in trials}
        self._live = None

    def __getstate__(self) -> dict:
        # Tune pickles its run config (callbacks included) into the experiment's folder; the
        # console and the live display stay with this driver.
        return {"rows": self.rows}

    def __setstate__(self, state: dict) -> None:
        from rich.console import Console

        self.rows, self.console, self._live = state["rows"], Console(), None

    def live(self):
        from rich.live import Live

        self._live = Live(self.render(), console=self.console, refresh_per_second=2, transient=True)
        return self._live

    def render(self):
        from rich.table import Table

        table = Table(title="trials", show_lines=False)
        for column in ("trial", "state", "step", "eval/reward", "eval/kl", "seconds"):
            table.add_column(column, justify="left" if column in ("trial", "state") else "right")
        for trial_id, row in self.rows.items():
            table.add_row(trial_id, row["state"], f"{row.get('step', 0)}/{row['max_steps']}",
                          _fmt(row.get("eval/reward")), _fmt(row.get("eval/kl")), _fmt(row.get("seconds"), 0))
        return table

    def _update(self, trial, **row) -> None:
        trial_id = json.loads(trial.config["trial"])["id"]
        self.rows[trial_id].update(row)
        if self._live is not None:
            self._live.update(self.render())

    def on_trial_start(self, iteration, trials, trial, **info):
        self._update(trial, state="running", started=time.perf_counter())
        self.console.print(f"started {json.loads(trial.config['trial'])['id']}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._update(trial, **{k: result[k] for k in ("step", "eval/reward", "eval/kl") if k in result})

    def on_trial_complete(self, iteration, trials, trial, **info):
        trial_id = json.loads(trial.config["trial"])["id"]
        seconds = time.perf_counter() - self.rows[trial_id].get("started", time.perf_counter())
        self._update(trial, state="finished", seconds=seconds)
        self.console.print(f"finished {trial_id} in {seconds:.0f} s")

    def on_trial_error(self, iteration, trials, trial, **info):
        trial_id = json.loads(trial.config["trial"])["id"]
        self._update(trial, state="[red]failed[/]")
        self.console.print(f"[red]failed[/] {trial_id}")


def _fmt(value, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def concurrency_note(result: SweepResult) -> str:
    eff = result.efficiency
    return (f"{result.wall_seconds:.0f} s wall, up to {result.concurrency} trial(s) at once"
            + (f", scheduling efficiency {eff:.2f}" if eff is not None else ""))



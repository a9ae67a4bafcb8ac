"""The stages every controller is built from, each once.

    run = open_run(cfg, resume)                    output_dir, the newest complete checkpoint
    inputs = prepare_inputs(cfg, console)          model dir, tokenizer, tokenized data
    connect(cfg)                                   local Ray, or the cluster at cluster.address
    ref = start_reference(cfg, inputs, console)    the reference role's group
    cache = fill_reference_cache(...)              RefCache hit, or computed on `ref`
    policy, infos = start_policy(...)              the policy role's group, built and resumed
    intervals(start, end, every=[...])             how many steps each call runs
    save_checkpoint(policy, run, step, state)      every rank saves, then the marker file
    export(policy, run)                            a plain Hugging Face directory

A controller (prefopt.algorithms.offline, and PPO, ReST, ... next) is a loop over these.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from prefopt.config import RunConfig

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"


@dataclass
class Run:
    """A run's directory and what it resumes from (checkpoint None: a fresh start)."""

    output_dir: Path
    checkpoint: tuple[str, dict] | None  # (tag, state) of the newest complete checkpoint

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
            raise ValueError(f"{self.output_dir / CHECKPOINTS / tag}: the checkpoint was trained on other "
                             f"data (fingerprint {state['data_fingerprint'][:16]}, now {data.fingerprint[:16]}); "
                             "use --fresh or another output_dir")


def latest_checkpoint(output_dir: Path) -> tuple[str, dict] | None:
    """The newest complete checkpoint (one with a state file), ignoring any half-written one."""
    complete = []
    for state_file in (output_dir / CHECKPOINTS).glob(f"step*/{STATE_FILE}"):
        state = json.loads(state_file.read_text())
        complete.append((state["step"], state_file.parent.name, state))
    if not complete:
        return None
    _, tag, state = max(complete)
    return tag, state


def open_run(cfg: RunConfig, resume: bool | None) -> Run:
    """resume: None = resume when a checkpoint exists; True = must resume; False = start over."""
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = latest_checkpoint(output_dir)
    if resume is True and checkpoint is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {output_dir / CHECKPOINTS}")
    if resume is False and checkpoint is not None:
        shutil.rmtree(output_dir / CHECKPOINTS)
        checkpoint = None
    metrics = output_dir / METRICS_FILE
    if checkpoint is None:
        metrics.unlink(missing_ok=True)
    elif metrics.is_file():  # drop what was logged after the checkpoint: those steps run again
        kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= checkpoint[1]["step"]]
        metrics.write_text("".join(line + "\n" for line in kept))
    (output_dir / "config.yaml").write_text(cfg.to_yaml())
    return Run(output_dir, checkpoint)


@dataclass
class Inputs:
    model_dir: Path  # the starting model (the policy's, and the reference's unless ref.model_path)
    tokenizer: object
    data: object  # prefopt.data.TokenizedData

    def reference_dir(self, cfg: RunConfig) -> Path:
        return Path(cfg.ref.model_path) if cfg.ref.model_path else self.model_dir


def prepare_inputs(cfg: RunConfig, console) -> Inputs:
    """The opening of every run: model, tokenizer, and the data read, validated and tokenized."""
    from prefopt.data import prepare
    from prefopt.models import model_and_tokenizer

    with console.status("model and tokenizer"):
        model_dir, tokenizer = model_and_tokenizer(cfg.model, cfg.output_dir)
    with console.status("reading, validating and tokenizing the data"):
        data = prepare(cfg, tokenizer, Path(cfg.output_dir) / "data")
    console.print(f"data: {data.report.summary()}  [dim]fingerprint {data.fingerprint[:16]}[/]")
    return Inputs(model_dir, tokenizer, data)


def connect(cfg: RunConfig, with_reference: bool) -> None:
    from prefopt.cluster.ray_setup import connect as ray_connect

    roles = [cfg.policy] + ([cfg.reference] if with_reference else [])
    ray_connect(cfg.cluster, roles)


def start_reference(cfg: RunConfig, inputs: Inputs, console):
    """The reference role: `ref.num_workers` frozen engine workers holding the data."""
    from prefopt.cluster.worker_group import WorkerGroup
    from prefopt.workers.reference import ReferenceWorker

    with console.status(f"starting {cfg.ref.num_workers} reference worker(s)"):
        group = WorkerGroup(ReferenceWorker, cfg.reference, cfg.cluster, name="reference", key="ref",
                            init_args=(cfg.model_dump_json(),))
        try:
            group.call("setup", str(inputs.reference_dir(cfg)), str(inputs.data.path))
        except BaseException:
            group.shutdown()
            raise
    return group


def start_policy(cfg: RunConfig, inputs: Inputs, run: Run, console, *, ref_cache=None, reference=None):
    """The policy role: built, its data and reference attached, resumed from the run's checkpoint.
    -> (group, setup info of each rank)."""
    from prefopt.cluster.worker_group import WorkerGroup
    from prefopt.workers.policy import PolicyWorker

    with console.status(f"starting {cfg.policy.num_workers} policy worker(s)"):
        group = WorkerGroup(PolicyWorker, cfg.policy, cfg.cluster, name="policy", key="policy",
                            init_args=(cfg.model_dump_json(),))
    try:
        live = reference.actors if reference is not None and cfg.ref.mode == "live" else None
        infos = group.call("setup", str(inputs.model_dir), str(inputs.data.path), ref_cache=ref_cache,
                           ref_actors=live)
        stage = infos[0]["zero_stage"]
        asked = cfg.policy.deepspeed.zero_stage
        why = "" if stage == asked else f" ({asked} asked: one rank has nothing to partition)"
        console.print(f"policy: {group.size} rank(s), ZeRO stage {stage}{why}, "
                      f"{infos[0]['param_bytes'] / 2**20:.2f} MiB of parameters on rank 0")
        if run.checkpoint is not None:
            tag, _ = run.checkpoint
            group.call("load_checkpoint", str(run.output_dir / CHECKPOINTS), tag)
            console.print(f"resumed from {run.output_dir / CHECKPOINTS / tag} at step {run.start_step}")
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


def save_checkpoint(group, run: Run, step: int, state: dict) -> None:
    tag = f"step{step}"
    directory = run.output_dir / CHECKPOINTS
    group.call("save_checkpoint", str(directory), tag, {"step": step})
    # Written after every rank has saved: a state file means the checkpoint is complete.
    (directory / tag / STATE_FILE).write_text(json.dumps({"step": step, **state}))


def export(group, run: Run, console) -> Path:
    export_dir = run.output_dir / "model"
    with console.status("exporting the policy"):
        group.call("export", str(export_dir))
    console.print(f"exported policy to [bold]{export_dir}[/]")
    return export_dir

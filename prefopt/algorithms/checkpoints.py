"""A run's state: its directory (any store), the checkpoints in it, and what a run resumes from.

    run = open_run(cfg, resume)          output_dir, the newest checkpoint that verifies, the log trimmed to it
    save_ranks(group, run, step, part)   every rank of a group saves its part and says what it wrote
    write_state(run, step, state)        then the marker file, listing every file: the checkpoint is complete

A checkpoint is checked twice, once where its bytes are written and once before anyone reads
them. Each rank hashes the files it wrote on its own disk, before any upload (EngineWorker.
save_checkpoint); the state file, written last, lists every file of every group with its size
and sha256. A resume verifies the newest checkpoint on the driver, before any group starts
(latest_checkpoint): sizes from one listing of the store, then every byte read once and hashed.
A checkpoint that fails is skipped for the one before it, said in one line; since nothing has
loaded yet, the start step, the state and the trimmed log all come from the checkpoint used, and
no rank can find damage after the groups started. The price is one extra read of the checkpoint
resumed from, on the driver (docs/storage.md).
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from prefopt.config import RunConfig
from prefopt.errors import UserError
from prefopt.storage import Store, local_dir_for


class PreflightError(UserError, ValueError):
    """A run that cannot start here; the message names the config field to change."""


CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
FILES = "files"  # the state file's list: {name in the checkpoint's folder: {"size": bytes, "sha256": hex}}

log = logging.getLogger("prefopt.checkpoints")


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
    # step -> {name: {size, sha256}} of the files the ranks saved, until write_state lists them
    saved_files: dict[int, dict[str, dict]] = field(default_factory=dict)

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


def _checkpoint_states(store: Store) -> list[tuple[int, str, dict | str]]:
    """(step, tag, state) of every checkpoint with a state file, by step; where that file is
    damaged (not JSON, no step) the state is the reason, in words. One read per checkpoint (a
    round trip each on an object store), no existence check first."""
    found: list[tuple[int, str, dict | str]] = []
    for tag in (store / CHECKPOINTS).children():
        if not tag.startswith("step") or not tag[4:].isdigit():
            continue
        try:
            state = json.loads((store / CHECKPOINTS / tag / STATE_FILE).read_text())
        except FileNotFoundError:  # being written, or killed while it was
            continue
        except ValueError:  # not JSON, or not text: damaged (it is written whole, then moved)
            state = None
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            found.append((int(tag[4:]), tag, f"{STATE_FILE} is damaged"))
            continue
        found.append((state["step"], tag, state))
    return sorted(found, key=lambda entry: entry[0])


def complete_checkpoints(store: Store) -> list[tuple[int, str, dict]]:
    """(step, tag, state) of every complete checkpoint (one with a readable state file, written
    last), by step. Its files are not verified here: latest_checkpoint does, for the one resumed from."""
    return [(step, tag, state) for step, tag, state in _checkpoint_states(store) if isinstance(state, dict)]


def checkpoint_problem(directory: Store, files: dict[str, dict] | None) -> str | None:
    """Why the checkpoint in `directory` cannot be resumed from, in a few words naming the file
    (None: it can). Sizes first, from one listing; then each file read once and hashed, a few at
    a time. A state file without a file list (written before prefopt listed files) is trusted."""
    if files is None:
        return None
    sizes = {name: size for name, size, _ in directory.files()}
    for name, listed in sorted(files.items()):
        if name not in sizes:
            return f"{name} is missing"
        if sizes[name] != listed["size"]:
            return f"{name} is {sizes[name]} bytes, {listed['size']} listed"
    names = sorted(files)
    with ThreadPoolExecutor(max_workers=min(8, len(names) or 1)) as pool:  # hashing and reads release the GIL
        digests = list(pool.map(lambda name: (directory / name).sha256(), names))
    for name, digest in zip(names, digests, strict=True):
        if digest != files[name]["sha256"]:
            return f"{name} does not match its sha256 (same size, other bytes)"
    return None


def latest_checkpoint(store: Store) -> tuple[str, dict] | None:
    """The newest complete checkpoint whose files verify (checkpoint_problem), ignoring any
    half-written one. Damaged newer ones are skipped, and said in one line:
    `<dir>/checkpoints/step4: mp_rank_00_model_states.pt is 1234 bytes, 2468 listed: resuming from step2`."""
    skipped = []
    for _, tag, state in reversed(_checkpoint_states(store)):
        problem = state if isinstance(state, str) else checkpoint_problem(store / CHECKPOINTS / tag, state.get(FILES))
        if problem is None:
            if skipped:
                log.warning("%s: resuming from %s", "; ".join(skipped), tag)
            return tag, state
        skipped.append(f"{store / CHECKPOINTS / tag}: {problem}")
    if skipped:
        log.warning("%s: no complete checkpoint left, starting from step 0", "; ".join(skipped))
    return None


def open_run(cfg: RunConfig, resume: bool | None) -> Run:
    """resume: None = resume when a checkpoint exists; True = must resume; False = start over.
    The checkpoint resumed from is verified here, before anything starts (latest_checkpoint)."""
    store = Store.at(cfg.output_dir)
    local_dir = local_dir_for(store.uri)
    local_dir.mkdir(parents=True, exist_ok=True)
    if resume is False:  # nothing to verify: every checkpoint goes, complete or not
        (store / CHECKPOINTS).delete()
        checkpoint = None
    else:
        checkpoint = latest_checkpoint(store)
        if resume is True and checkpoint is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {store / CHECKPOINTS}")
    metrics = local_dir / METRICS_FILE
    if checkpoint is None:
        metrics.unlink(missing_ok=True)
    else:
        if not store.is_local:  # the log as of the checkpoint, whatever this machine kept
            log_file = store / METRICS_FILE
            metrics.write_bytes(log_file.read_bytes() if log_file.is_file() else b"")
        if metrics.is_file():  # drop what was logged after the checkpoint: those steps run again
            kept = [line for line in metrics.read_text().splitlines()
                    if json.loads(line)["step"] <= checkpoint[1]["step"]]
            metrics.write_text("".join(line + "\n" for line in kept))
    (store / "config.yaml").write_text(cfg.to_yaml())
    return Run(store, local_dir, checkpoint)


def checkpoint_location(run: Run, step: int, part: str | None = None) -> tuple[str, str]:
    """(directory, tag) of a group's checkpoint: the policy's is checkpoints/step<N>; another
    model of the same run (PPO's critic) saves its `part` inside it, checkpoints/step<N>/<part>."""
    tag = f"step{step}"
    return ((run.store / CHECKPOINTS).uri, tag) if part is None else (run.checkpoint_dir(tag).uri, part)


def save_ranks(group, run: Run, step: int, part: str | None = None) -> None:
    """Every rank of `group` saves its part of checkpoint step<N>; what each wrote (name, size,
    sha256) is kept on `run` for write_state to list."""
    if part is None:  # the checkpoint is saved anew (a resume re-runs its step): it is no longer complete
        (run.checkpoint_dir(f"step{step}") / STATE_FILE).delete()
    written = group.call("save_checkpoint", *checkpoint_location(run, step, part), {"step": step})
    files = run.saved_files.setdefault(step, {})
    prefix = "" if part is None else f"{part}/"
    for rank_files in written:
        # DeepSpeed 0.19 writes each name from one rank (docs/storage.md); should two ranks ever
        # write one name, the same bytes are one entry and different bytes are a bug to hear of.
        for name, size, sha256 in rank_files:
            entry = {"size": size, "sha256": sha256}
            if files.setdefault(prefix + name, entry) != entry:
                raise RuntimeError(f"{run.checkpoint_dir(f'step{step}')}: two ranks wrote {prefix + name} "
                                   "with different bytes")


def saver(group, run: Run):
    """run_steps' `save` for a run with one trained group."""
    return lambda step: save_ranks(group, run, step)


def write_state(run: Run, step: int, state: dict) -> None:
    # Written after every rank of every group has saved, and after the log: a state file means
    # the checkpoint is complete, and its file list says what complete is.
    run.sync_log()
    files = run.saved_files.pop(step, None)
    listed = {FILES: dict(sorted(files.items()))} if files else {}
    (run.checkpoint_dir(f"step{step}") / STATE_FILE).write_text(json.dumps({"step": step, **state, **listed},
                                                                           indent=1))

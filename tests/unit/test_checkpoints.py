"""Checkpoints that are checked: what ranks list as they save, and how a resume verifies it
(prefopt.algorithms.checkpoints, prefopt.storage's checksum helpers). No Ray, no DeepSpeed: the
files are bytes written here; tests/integration/test_checkpoint_integrity.py does it for real."""

import hashlib
import json
import logging

import pytest

from prefopt.algorithms.checkpoints import (
    CHECKPOINTS,
    FILES,
    STATE_FILE,
    checkpoint_problem,
    open_run,
    save_ranks,
    write_state,
)
from prefopt.config import RunConfig
from prefopt.storage import Store, files_written, rank_writes

# A ZeRO-3 checkpoint of two ranks, as DeepSpeed 0.19 names its files, and the policy's own.
RANK_FILES = {0: ["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt",
                  "rng_rank0.pt"],
              1: ["bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt",
                  "rng_rank1.pt"]}
MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"


def write_checkpoint(folder, step: int, listed: bool = True) -> dict:
    """A checkpoint folder whose files hold distinct bytes, and its state file (with or without
    the file list). -> the file list."""
    folder.mkdir(parents=True)
    files = {}
    for rank, names in RANK_FILES.items():
        for name in names:
            data = f"{name} of step {step} ".encode() * (10 + rank)
            (folder / name).write_bytes(data)
            files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    state = {"step": step, "mlflow_run_id": f"run{step}"} | ({FILES: files} if listed else {})
    (folder / STATE_FILE).write_text(json.dumps(state))
    return files


def test_each_file_is_listed_by_the_rank_that_wrote_it_with_its_size_and_sha256(tmp_path):
    for name in RANK_FILES[0] + RANK_FILES[1] + ["mp_rank_00_model_states.pt", "latest", ".x.1234.tmp"]:
        (tmp_path / name).write_bytes(name.encode())
    (tmp_path / "critic").mkdir()  # another group's part: its own ranks list it
    (tmp_path / "critic" / "rng_rank0.pt").write_bytes(b"critic")

    rank0, rank1 = files_written(tmp_path, 0), files_written(tmp_path, 1)
    assert [name for name, _, _ in rank0] == sorted(RANK_FILES[0] + ["mp_rank_00_model_states.pt"])
    assert [name for name, _, _ in rank1] == sorted(RANK_FILES[1])
    name, size, sha256 = rank1[0]
    assert (size, sha256) == (len(name), hashlib.sha256(name.encode()).hexdigest())
    # DeepSpeed's `latest` pointer and a write in progress are nobody's part of a checkpoint.
    assert not any(rank_writes(name, rank) for name in ["latest", ".x.1234.tmp"] for rank in (0, 1))


def test_verification_names_a_missing_file_a_wrong_size_a_wrong_checksum_and_trusts_an_old_state(tmp_path):
    folder = tmp_path / "step4"
    files = write_checkpoint(folder, 4)
    store = Store.at(folder)
    assert checkpoint_problem(store, files) is None
    assert checkpoint_problem(store, None) is None  # a state file of the previous version: no list to check

    model_states = folder / MODEL_STATES
    whole = model_states.read_bytes()
    model_states.write_bytes(whole[: len(whole) // 2])
    assert checkpoint_problem(store, files) == f"{MODEL_STATES} is {len(whole) // 2} bytes, {len(whole)} listed"
    model_states.write_bytes(whole[:-1] + b"!")  # same size, one byte changed
    assert checkpoint_problem(store, files) == f"{MODEL_STATES} does not match its sha256 (same size, other bytes)"
    model_states.unlink()
    assert checkpoint_problem(store, files) == f"{MODEL_STATES} is missing"
    assert checkpoint_problem(store, None) is None


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one_in_one_line(tmp_path, caplog):
    cfg = RunConfig(output_dir=str(tmp_path))
    write_checkpoint(tmp_path / CHECKPOINTS / "step2", 2)
    files = write_checkpoint(tmp_path / CHECKPOINTS / "step4", 4)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)))
    model_states = tmp_path / CHECKPOINTS / "step4" / MODEL_STATES
    model_states.write_bytes(model_states.read_bytes()[:100])

    with caplog.at_level(logging.WARNING, logger="prefopt.checkpoints"):
        run = open_run(cfg, resume=None)
    assert (run.start_step, run.mlflow_run_id) == (2, "run2")
    size = files[MODEL_STATES]["size"]
    assert caplog.messages == [f"{tmp_path}/{CHECKPOINTS}/step4: {MODEL_STATES} is 100 bytes, {size} listed: "
                               "resuming from step2"]
    # The log is trimmed to the checkpoint resumed from, not to the damaged one.
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]

    # A state file cut short is damaged, not a crash; with no checkpoint left a resume starts over.
    (tmp_path / CHECKPOINTS / "step2" / STATE_FILE).write_text('{"step": 2, "mlflow_ru')
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="prefopt.checkpoints"):
        assert open_run(cfg, resume=None).checkpoint is None
    assert caplog.messages == [f"{tmp_path}/{CHECKPOINTS}/step4: {MODEL_STATES} is 100 bytes, {size} listed; "
                               f"{tmp_path}/{CHECKPOINTS}/step2: {STATE_FILE} is damaged: "
                               "no complete checkpoint left, starting from step 0"]
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint"):
        open_run(cfg, resume=True)


def test_a_checkpoint_written_before_file_lists_still_resumes(tmp_path, caplog):
    write_checkpoint(tmp_path / CHECKPOINTS / "step2", 2)
    write_checkpoint(tmp_path / CHECKPOINTS / "step4", 4, listed=False)
    (tmp_path / CHECKPOINTS / "step4" / MODEL_STATES).write_bytes(b"cut")  # nothing to tell it by
    with caplog.at_level(logging.WARNING, logger="prefopt.checkpoints"):
        assert open_run(RunConfig(output_dir=str(tmp_path)), resume=None).start_step == 4
    assert caplog.messages == []


class SavingGroup:
    """A group whose ranks 'save' as EngineWorker.save_checkpoint does, from given bytes."""

    def __init__(self, written: list[dict[str, bytes]]):
        self.written = written
        self.calls = []

    def call(self, method, directory, tag, client_state):
        self.calls.append((method, directory, tag, client_state))
        return [[(name, len(data), hashlib.sha256(data).hexdigest()) for name, data in files.items()]
                for files in self.written]


def test_the_state_file_lists_every_file_of_every_group_and_a_resave_drops_the_old_one(tmp_path):
    run = open_run(RunConfig(output_dir=str(tmp_path)), resume=None)
    policy = SavingGroup([{"zero_pp_rank_0_a.pt": b"p0", "shared.pt": b"s"}, {"zero_pp_rank_1_a.pt": b"p11"}])
    critic = SavingGroup([{"rng_rank0.pt": b"c0"}, {"rng_rank1.pt": b"c1"}])
    save_ranks(policy, run, 4)
    save_ranks(critic, run, 4, "critic")
    assert policy.calls == [("save_checkpoint", f"{tmp_path}/{CHECKPOINTS}", "step4", {"step": 4})]
    assert critic.calls == [("save_checkpoint", f"{tmp_path}/{CHECKPOINTS}/step4", "critic", {"step": 4})]
    write_state(run, 4, {"mlflow_run_id": "r"})
    state = json.loads((tmp_path / CHECKPOINTS / "step4" / STATE_FILE).read_text())
    assert state["step"] == 4 and state["mlflow_run_id"] == "r"
    assert {name: entry["size"] for name, entry in state[FILES].items()} == {
        "zero_pp_rank_0_a.pt": 2, "shared.pt": 1, "zero_pp_rank_1_a.pt": 3, "critic/rng_rank0.pt": 2,
        "critic/rng_rank1.pt": 2}
    assert state[FILES]["shared.pt"]["sha256"] == hashlib.sha256(b"s").hexdigest()
    assert run.saved_files == {}  # written once, then forgotten

    # Saving step 4 again (a resume from an earlier step re-runs it) first takes its state file
    # away: until the new one is written the checkpoint is incomplete, never stale.
    save_ranks(policy, run, 4)
    assert not (tmp_path / CHECKPOINTS / "step4" / STATE_FILE).exists()
    # Two ranks that wrote one name: the same bytes are one entry, other bytes a bug said at once.
    save_ranks(SavingGroup([{"shared.pt": b"s"}, {"shared.pt": b"s"}]), run, 6)
    assert list(run.saved_files[6]) == ["shared.pt"]
    with pytest.raises(RuntimeError, match="two ranks wrote shared.pt with different bytes"):
        save_ranks(SavingGroup([{"shared.pt": b"s"}, {"shared.pt": b"t"}]), run, 8)


def test_a_checkpoint_on_an_object_store_is_verified_from_its_listing_and_bytes(s3, tmp_path):
    import os

    local = tmp_path / "step4"
    files = write_checkpoint(local, 4)
    store = Store.at(s3.bucket(f"b-{os.urandom(4).hex()}") + "/run/step4")
    store.upload(local)
    assert checkpoint_problem(store, files) is None
    (store / MODEL_STATES).write_bytes(b"x" * files[MODEL_STATES]["size"])
    assert checkpoint_problem(store, files) == f"{MODEL_STATES} does not match its sha256 (same size, other bytes)"

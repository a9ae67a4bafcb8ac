"""prefopt.storage on this machine's disk and on a real S3-compatible server (tests/s3_server.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from prefopt import storage
from prefopt.storage import StorageError, Store


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """An empty directory: a local path, or a fresh bucket on the S3 test server."""
    if request.param == "local":
        return str(tmp_path / "store")
    server = request.getfixturevalue("s3")
    return server.bucket(f"b-{os.urandom(4).hex()}") + "/runs"


def test_small_files_round_trip_and_replace_whole(root):
    store = Store.at(root)
    state = store / "checkpoints" / "step2" / "trainer_state.json"
    assert not state.exists() and not state.is_file()
    state.write_text('{"step": 2}')
    state.write_text('{"step": 2, "more": 1}')  # replaced, never appended to
    assert json.loads(state.read_text()) == {"step": 2, "more": 1}
    assert (store / "checkpoints").children() == ["step2"]  # no temporary name left behind
    assert (store / "checkpoints" / "step2").children() == ["trainer_state.json"]
    assert (store / "nothing-here").children() == []
    (store / "checkpoints").delete()
    assert not (store / "checkpoints").exists()
    (store / "checkpoints").delete()  # deleting what is gone is no error


def test_upload_then_download_keeps_every_file_and_filters(root, tmp_path):
    local = tmp_path / "made"
    (local / "sub").mkdir(parents=True)
    (local / "a.bin").write_bytes(bytes(range(256)) * 10)
    (local / "sub" / "b.txt").write_text("b")
    where = Store.at(root) / "dir"
    where.upload(local)
    assert [(name, size) for name, size, _ in where.files()] == [("a.bin", 2560), ("sub/b.txt", 1)]
    back = tmp_path / "back"
    where.download(back, keep=lambda relative: "/" not in relative)
    assert (back / "a.bin").read_bytes() == (local / "a.bin").read_bytes()
    assert not (back / "sub").exists()


def test_localize_downloads_once_and_again_when_the_directory_changed(s3, tmp_path, monkeypatch):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    where = Store.at(s3.bucket(f"b-{os.urandom(4).hex()}")) / "model"
    (where / "config.json").write_text("{}")
    first = storage.localize(where.uri)
    assert (first / "config.json").read_text() == "{}" and first.parent == tmp_path / "cache" / "store"
    (first / "mark").write_text("the same copy")
    assert storage.localize(where.uri) == first  # no second download
    (where / "config.json").write_text('{"changed": true}')
    again = storage.localize(where.uri)
    assert again != first and json.loads((again / "config.json").read_text()) == {"changed": True}
    local = tmp_path / "here"
    assert storage.localize(str(local)) == local  # a local path is used in place
    with pytest.raises(StorageError, match="no such directory, or it is empty"):
        storage.localize(where.uri + "-missing")


def test_a_rank_reads_its_own_checkpoint_files_and_the_shared_ones():
    names = ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
             "bf16_zero_pp_rank_12_mp_rank_00_optim_states.pt", "rng_rank1.pt", "rng_rank12.pt",
             "mp_rank_00_model_states.pt", "zero_to_fp32.py"]
    assert [n for n in names if storage.rank_needs(n, 1)] == [
        "zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_rank1.pt", "mp_rank_00_model_states.pt", "zero_to_fp32.py"]
    assert [n for n in names if storage.rank_needs(n, 12)] == [
        "bf16_zero_pp_rank_12_mp_rank_00_optim_states.pt", "rng_rank12.pt", "mp_rank_00_model_states.pt",
        "zero_to_fp32.py"]


def test_saving_to_a_store_uploads_the_tag_and_loading_fetches_one_ranks_share(s3):
    directory = s3.bucket(f"b-{os.urandom(4).hex()}") + "/run/checkpoints"
    for rank in (0, 1):  # each rank saves into its own local folder, as on two nodes
        with storage.saving_to(directory, "step4") as local:
            (Path(local) / "step4").mkdir()
            (Path(local) / "step4" / f"rng_rank{rank}.pt").write_text(f"rank {rank}")
            (Path(local) / "latest").write_text("step4")  # DeepSpeed's pointer: not needed, not uploaded
    with storage.saving_to(directory + "/step4", "critic") as local:  # a part saved inside the checkpoint
        (Path(local) / "critic").mkdir()
        (Path(local) / "critic" / "rng_rank1.pt").write_text("critic")
    tag = Store.at(directory) / "step4"
    assert [f for f, _, _ in tag.files()] == ["critic/rng_rank1.pt", "rng_rank0.pt", "rng_rank1.pt"]
    assert Store.at(directory).children() == ["step4"]
    with storage.loading_from(directory, "step4", rank=1) as local:
        assert sorted(p.name for p in (Path(local) / "step4").iterdir()) == ["rng_rank1.pt"]
        assert (Path(local) / "step4" / "rng_rank1.pt").read_text() == "rank 1"
    assert not Path(local).exists()  # the local copy is gone with the context


def test_a_local_directory_is_used_in_place(tmp_path):
    with storage.saving_to(str(tmp_path), "step1") as local:
        assert local == str(tmp_path)
    with storage.writing_dir(str(tmp_path / "model")) as out:
        assert out == tmp_path / "model" and out.is_dir()


def test_addresses_beside_and_for_this_machine(tmp_path, monkeypatch):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    assert storage.sibling("s3://bucket/runs/dpo/", "refcache") == "s3://bucket/runs/refcache"
    assert storage.sibling(tmp_path / "runs" / "dpo", "refcache") == str(tmp_path / "runs" / "refcache")
    here = storage.local_dir_for("s3://bucket/runs/dpo")
    assert here.parent == tmp_path / "cache" / "runs" and here.name.startswith("dpo-")
    assert storage.local_dir_for("s3://bucket/runs/dpo/") == here != storage.local_dir_for("gs://bucket/runs/dpo")
    assert storage.local_dir_for("runs/dpo") == Path("runs/dpo")
    assert storage.is_remote("s3://b/x") and storage.is_remote("gs://b/x") and not storage.is_remote("file:///x")
    assert storage.store_env({"AWS_ENDPOINT_URL": "http://h", "AWS_CONFIG_FILE": "/home/me/.aws/config",
                              "AWS_PROFILE": "", "HOME": "/home/me"}) == {"AWS_ENDPOINT_URL": "http://h"}


def test_an_unreachable_store_is_one_line_naming_it_and_what_to_set(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(StorageError) as err:
        Store.at("s3://bucket/run").children()
    message = str(err.value)
    assert message.startswith("s3://bucket/run: ") and "AWS_ENDPOINT_URL" in message and "\n" not in message


def test_options_written_in_the_uri_stay_at_its_end(s3, tmp_path, monkeypatch):
    # pyarrow's own way to name an endpoint, without AWS_ENDPOINT_URL: every derived address keeps it.
    bucket = s3.bucket(f"b-{os.urandom(4).hex()}")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    host = s3.endpoint.removeprefix("http://")
    run = Store.at(f"{bucket}/run/?endpoint_override={host}&scheme=http")
    state = run / "checkpoints" / "step1" / "trainer_state.json"
    assert state.uri == f"{bucket}/run/checkpoints/step1/trainer_state.json?endpoint_override={host}&scheme=http"
    state.write_text("{}")
    assert Store.at(state.uri).read_text() == "{}"  # what a rank re-opens from the address alone
    assert storage.sibling(run.uri, "refcache") == f"{bucket}/refcache?endpoint_override={host}&scheme=http"
    assert storage.local_dir_for(run.uri).name.startswith("run-")
    assert (storage.localize((run / "checkpoints").uri) / "step1" / "trainer_state.json").read_text() == "{}"


def test_an_endpoint_nobody_answers_is_said_at_once(s3):
    storage.check_endpoint({"AWS_ENDPOINT_URL": s3.endpoint})  # the test server answers
    storage.check_endpoint({})  # no endpoint named: AWS itself, nothing to check
    with pytest.raises(StorageError, match=r"^AWS_ENDPOINT_URL=http://127.0.0.1:9: nothing answers there .*start "
                                           r"the store, or correct AWS_ENDPOINT_URL$"):
        storage.check_endpoint({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"})


def test_a_missing_bucket_is_named_as_such(s3):
    with pytest.raises(StorageError, match=r"^s3://no-such-bucket/run/x: the bucket no-such-bucket does not exist; "
                                           r"create it first \(prefopt never creates buckets\)$"):
        (Store.at("s3://no-such-bucket/run") / "x").write_text("probe")

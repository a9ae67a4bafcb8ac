"""Run state on any filesystem pyarrow understands: a local path, s3://, gs://, hdfs://.

A run's `output_dir` may be an object store, so that ranks on nodes without a shared disk save
and resume. Who does what with it:
- the driver reads and writes the run's small files (config.yaml, metrics.jsonl, each
  checkpoint's state file, written last) through `Store`, and uploads once the directories it
  made on its own disk and ranks must open (tokenized data, the tiny model);
- each rank saves its DeepSpeed checkpoint files into a temporary local directory and uploads
  them (`saving_to`), and to resume downloads only its own files and the shared ones
  (`loading_from`): DeepSpeed reads and writes local paths only;
- a directory a process must open by path (a model, tokenized data) is downloaded once per
  node into a cache keyed by its address and listing (`localize`).
A local `output_dir` goes through the same calls and is used in place: no copies.

Credentials and endpoints come from the environment, as pyarrow reads it (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for an S3-compatible server, ...); `prefopt submit`
forwards the AWS_* variables to the job.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from pyarrow import fs as pafs

from prefopt.errors import UserError

# AWS_* variables that name files on this machine mean nothing on another node.
AWS_LOCAL_FILES = ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CA_BUNDLE")
CACHE_ENV = "PREFOPT_CACHE_DIR"  # this machine's copies (store/) and run folders (runs/); default ~/.cache/prefopt
_COMPLETE = ".complete"  # written last into a localized copy


class StorageError(UserError, OSError):
    """A store that cannot be reached or read: the message names the address and what to set."""


def store_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables that tell pyarrow how to reach an object store (credentials, endpoint,
    region), to hand to ranks and jobs on other nodes."""
    return {key: value for key, value in environ.items()
            if key.startswith("AWS_") and key not in AWS_LOCAL_FILES and value}


def is_remote(where: str | os.PathLike) -> bool:
    """Whether `where` is a URI of another filesystem than this machine's (file:// is local)."""
    text = str(where)
    return "://" in text and not text.startswith("file://")


@dataclass(frozen=True)
class Store:
    """A file or directory on some filesystem: `uri` as the user wrote it, `path` inside `fs`."""

    uri: str
    fs: pafs.FileSystem
    path: str

    @classmethod
    def at(cls, where: str | os.PathLike) -> Store:
        text = str(where)
        if not is_remote(text):
            local = os.path.abspath(os.path.expanduser(text.removeprefix("file://")))
            return cls(local, pafs.LocalFileSystem(), local)
        try:
            fs, path = pafs.FileSystem.from_uri(text)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
            raise StorageError(f"{text}: cannot open this filesystem ({exc})") from None
        base, query = text.partition("?")[::2]
        return cls(base.rstrip("/") + (f"?{query}" if query else ""), fs, path.rstrip("/"))

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def __truediv__(self, name: str) -> Store:
        # Options in the URI (s3://b/run?endpoint_override=...&scheme=http) stay at its end.
        base, query = self.uri.partition("?")[::2]
        return Store(f"{base}/{name}" + (f"?{query}" if query else ""), self.fs, f"{self.path}/{name}")

    def __str__(self) -> str:
        return self.uri

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def _info(self) -> pafs.FileInfo:
        with self._errors():
            return self.fs.get_file_info(self.path)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        # Network and permission failures surface as OSError from pyarrow; say where and what to set.
        try:
            yield
        except FileNotFoundError:
            raise
        except OSError as exc:
            first = str(exc).splitlines()[0]
            bucket = re.match(r"Bucket '([^']+)' not found", first)
            if bucket:  # pyarrow's text suggests an option of its own that prefopt does not expose
                raise StorageError(f"{self.uri}: the bucket {bucket[1]} does not exist; create it first "
                                   "(prefopt never creates buckets)") from None
            raise StorageError(f"{self.uri}: {first} (credentials and endpoint come from the environment: "
                               "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...)") from None

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def read_bytes(self) -> bytes:
        with self._errors(), self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """Write under a temporary name, then move: a reader sees the old file or the whole new one
        (rename on a local disk; on an object store a copy that appears only once complete)."""
        parent, name = self.path.rsplit("/", 1)
        tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
        with self._errors():
            self.fs.create_dir(parent, recursive=True)
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, self.path)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def sha256(self) -> str:
        """The sha256 of this file, read once as a stream (a download on an object store)."""
        with self._errors(), self.fs.open_input_stream(self.path) as f:
            return sha256_of(f)

    def children(self) -> list[str]:
        """Names of the entries of this directory (none when it does not exist), sorted."""
        with self._errors():
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted(info.base_name for info in infos)

    def files(self) -> list[tuple[str, int, float]]:
        """(path relative to this directory, size, modification time) of every file under it, sorted."""
        with self._errors():
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True))
        out = []
        for info in infos:
            if info.type == pafs.FileType.File:
                mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
                out.append((info.path[len(self.path) + 1 :], info.size, mtime))
        return sorted(out)

    def delete(self) -> None:
        """Remove this file or directory, if it exists."""
        kind = self._info().type
        with self._errors():
            if kind == pafs.FileType.Directory:
                self.fs.delete_dir(self.path)
            elif kind == pafs.FileType.File:
                self.fs.delete_file(self.path)

    def upload(self, local: Path) -> None:
        """Copy the local directory `local` here (every file, recursively)."""
        with self._errors():
            self.fs.create_dir(self.path, recursive=True)
            pafs.copy_files(str(local), self.path, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs, use_threads=True)

    def download(self, local: Path, keep: Callable[[str], bool] = lambda relative: True) -> None:
        """Copy the files of this directory that `keep(relative path)` wants into `local`."""
        for relative, _, _ in self.files():
            if keep(relative):
                (local / relative).parent.mkdir(parents=True, exist_ok=True)
                with self._errors():
                    pafs.copy_files(f"{self.path}/{relative}", str(local / relative), source_filesystem=self.fs,
                                    destination_filesystem=pafs.LocalFileSystem())


def check_endpoint(environ: Mapping[str, str] = os.environ, timeout_s: float = 3.0) -> None:
    """An S3-compatible endpoint named in the environment must answer a TCP connect: the S3 client
    retries a refused connection for seconds per call, so a server that is down or a wrong port is
    said here, at once."""
    import socket
    from urllib.parse import urlsplit

    for key in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if environ.get(key):
            url = urlsplit(environ[key] if "://" in environ[key] else f"http://{environ[key]}")
            port = url.port or (443 if url.scheme == "https" else 80)
            try:
                socket.create_connection((url.hostname, port), timeout=timeout_s).close()
            except OSError as exc:
                raise StorageError(f"{key}={environ[key]}: nothing answers there ({exc.strerror or exc}); start "
                                   f"the store, or correct {key}") from None
            return


def sibling(where: str | os.PathLike, name: str) -> str:
    """`name` beside `where` (in its parent directory), as a local path or a URI."""
    if is_remote(where):
        base, query = str(where).partition("?")[::2]
        return f"{base.rstrip('/').rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")
    return str(Path(where).expanduser().resolve().parent / name)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "prefopt")


def localize(where: str | os.PathLike) -> Path:
    """A local path holding the directory `where`: itself when local, else a copy downloaded
    once per node. The copy is keyed by the address and the listing (names, sizes, times), so a
    directory that changed on the store is fetched again; it is renamed into place complete."""
    if not is_remote(where):
        return Path(where)
    store = Store.at(where)
    files = store.files()
    if not files:
        raise StorageError(f"{store.uri}: no such directory, or it is empty")
    key = hashlib.sha256(json.dumps([store.uri, files]).encode()).hexdigest()[:24]
    target = cache_root() / "store" / f"{store.name}-{key}"
    if (target / _COMPLETE).is_file():
        return target
    with building_dir(target, complete=lambda done: (done / _COMPLETE).is_file()) as tmp:
        store.download(tmp)
        (tmp / _COMPLETE).write_text(store.uri)
    return target


@contextmanager
def building_dir(target: Path, complete: Callable[[Path], bool]) -> Iterator[Path]:
    """A fresh local directory beside `target`, renamed to it when the block ends without error:
    readers never see a half-built directory, and a process that loses a race to build the same
    target (`complete(target)` true when it looks) drops its own copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished the same directory first
            if not complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(local: Path, where: Store) -> str:
    """Upload a directory whose name says its content (tokenized-<fingerprint>) unless a complete
    copy is there already (its marker is written last). -> its URI."""
    if not (where / _COMPLETE).is_file():
        where.upload(local)
        (where / _COMPLETE).write_text("")
    return where.uri


# ------------------------------------------------------------------ checkpoints of one rank

# A DeepSpeed checkpoint directory holds one file per rank for its partition
# ([bf16_]zero_pp_rank_<r>_mp_rank_00_{model,optim}_states.pt; prefopt's rng_rank<r>.pt) and
# files every rank reads (mp_rank_00_model_states.pt below ZeRO-3).
_RANK_FILE = re.compile(r"(?:pp_rank_|rng_rank)(\d+)[_.]")


def rank_needs(name: str, rank: int) -> bool:
    """Whether `rank` reads checkpoint file `name` when it resumes (its own files and the shared)."""
    found = _RANK_FILE.search(name)
    return found is None or int(found[1]) == rank


def rank_writes(name: str, rank: int) -> bool:
    """Whether `rank` wrote checkpoint file `name`: the files named for it, and the shared ones on
    rank 0 (DeepSpeed's data-parallel writer). DeepSpeed's `latest` pointer is never read (prefopt
    names the tag) and a dot-file is a write in progress: neither is part of a checkpoint."""
    if name == "latest" or name.startswith("."):
        return False
    found = _RANK_FILE.search(name)
    return int(found[1]) == rank if found else rank == 0


def sha256_of(stream) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(8 << 20):  # 8 MiB at a time: a checkpoint file may be gigabytes
        digest.update(chunk)
    return digest.hexdigest()


def files_written(folder: Path, rank: int) -> list[tuple[str, int, str]]:
    """(name, size, sha256) of each file `rank` wrote in the checkpoint folder `folder` (its own
    files, not a part's sub-folder), hashed from this machine's disk before any upload."""
    out = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and rank_writes(path.name, rank):
            with path.open("rb") as f:
                out.append((path.name, path.stat().st_size, sha256_of(f)))
    return out


@contextmanager
def saving_to(directory: str, tag: str) -> Iterator[str]:
    """A local directory to save checkpoint `tag` into; on a store, its `tag` folder is uploaded
    to `directory/tag` afterwards (each rank uploads the files it wrote). Hash what was written
    inside the block (`files_written`): there the files are still on this machine's disk."""
    if not is_remote(directory):
        yield directory
        return
    with tempfile.TemporaryDirectory(prefix="prefopt-save-") as local:
        yield local
        (Store.at(directory) / tag).upload(Path(local) / tag)


@contextmanager
def loading_from(directory: str, tag: str, rank: int) -> Iterator[str]:
    """A local directory holding what `rank` reads of checkpoint `directory/tag` (the tag's own
    files; a part saved inside it, such as the critic's, is a folder and stays behind)."""
    if not is_remote(directory):
        yield directory
        return
    with tempfile.TemporaryDirectory(prefix="prefopt-load-") as local:
        (Store.at(directory) / tag).download(Path(local) / tag,
                                             keep=lambda relative: "/" not in relative and rank_needs(relative, rank))
        yield local


@contextmanager
def writing_dir(where: str) -> Iterator[Path]:
    """A local directory to write into; on a store, uploaded to `where` afterwards."""
    if not is_remote(where):
        Path(where).mkdir(parents=True, exist_ok=True)
        yield Path(where)
        return
    with tempfile.TemporaryDirectory(prefix="prefopt-out-") as local:
        yield Path(local)
        Store.at(where).upload(Path(local))


def local_dir_for(where: str | os.PathLike) -> Path:
    """Where this machine keeps its own files of a run whose output_dir is `where` (its log, the
    data it tokenized, the tiny model it built): `where` itself when local, else a folder named
    after it under the cache, kept between runs (the tiny model is built once per machine)."""
    if not is_remote(where):
        return Path(where)
    base, query = str(where).partition("?")[::2]
    key = hashlib.sha256((base.rstrip("/") + query).encode()).hexdigest()[:16]
    return cache_root() / "runs" / f"{base.rstrip('/').rsplit('/', 1)[-1]}-{key}"

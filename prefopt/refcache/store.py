"""Reference log-probs on any pyarrow filesystem: Parquet shards plus a manifest.

Layout of one cache, `<root>/<fingerprint[:16]>/`:
    manifest.json                       fingerprint, parts, roles, rows, shards, versions (metadata only)
    shard-000000.parquet                rows [0, shard_rows): one float32 column per role
    shard-000001.parquet                rows [shard_rows, 2 * shard_rows), ...
    .shard-000001.parquet.<uuid>.tmp    a write in progress, or left by a crash: never read

A shard is written if and only if a file with its final name exists and verifies (below);
presence comes from listing the directory, never from the manifest, so nothing needs updating
after a shard.

Why a final name always holds a complete shard:
  1. A final name is only ever created by `fs.move(tmp, final)`, called after `pq.write_table`
     wrote the whole temporary file (footer included) and closed it without error.
  2. Local and POSIX filesystems: move is rename(2), atomic; a crash leaves at most a temp file.
  3. Object stores (S3, GCS): move is a server-side copy then a delete of the source. A copy,
     like an upload, makes its object visible only once complete, and reads and listings are
     strongly consistent. A crash between copy and delete leaves a complete shard plus a
     leftover temp file, both harmless.
     Why not write the final name directly there? A pyarrow output stream closed while an
     exception unwinds a `with` block completes the upload with what it has: a truncated
     object. The temporary name confines that to a name nobody reads.
  4. Each writer has its own temp name, so two runs writing the same shard never interleave
     bytes; each moves a complete file and the last one wins.
  5. Readers still check every shard's footer (fingerprint, rows it covers, row count, columns):
     a file copied in from another cache is an error, not data.
Temporary names start with "." so that pyarrow.dataset, Spark and Hive also skip them.

Why a shard changed after it was written is never used (verification):
  Each shard's footer also holds `values_sha256`, a sha256 of its values (per role, in order:
  the role name, then its float32 little-endian bytes). A shard verifies when it parses as
  Parquet, its footer names this cache and these rows, it has the rows and float32 columns
  expected, and its values hash to the recorded checksum. A truncated file fails the parse (a
  Parquet footer is at the end of the file); changed values that still parse fail the checksum;
  a shard without a checksum (written before checksums existed) cannot be verified. A shard
  that fails is treated as missing: `check()` says why in one line per shard, `missing_shards()`
  includes it so that it is recomputed (overwritten), and `read()` refuses the cache.
  Verifying reads every shard once (a few bytes per row, read with a few threads, since an
  object store answers each read in tens of milliseconds): `check()` on the controller when
  it decides what to compute, and `read()` on each rank as it reads the values anyway.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from prefopt.errors import UserError
from prefopt.refcache.fingerprint import CACHE_VERSION, check_parts, combine, differing

MANIFEST = "manifest.json"
VALUES_DTYPE = "float32"
_SHARD_FILE = re.compile(r"^shard-(\d{6,})\.parquet$")
_FOOTER_KEY = b"prefopt.refcache"  # Parquet key-value metadata: which cache and rows a shard holds
ABSENT = "absent"  # check()'s reason for a shard that has no file yet
# Shards read at once while verifying: object stores answer each read in tens of ms, and a
# cache of millions of rows has hundreds of shards.
_READERS = 8


class RefCacheMismatch(UserError, ValueError):
    """A cache exists where one was asked for, but for other inputs. `differing`: part names."""

    def __init__(self, message: str, differing: list[str] | None = None):
        super().__init__(message)
        self.differing = differing or []


class RefCacheIncomplete(UserError, RuntimeError):
    """read() of a cache that still has shards to compute: absent, or failing verification."""


@dataclass(frozen=True)
class Shard:
    """Rows [start, stop) of the data (0-based positions, the index of TokenizedData.rows)."""

    index: int
    start: int
    stop: int

    @property
    def num_rows(self) -> int:
        return self.stop - self.start

    @property
    def file_name(self) -> str:
        return f"shard-{self.index:06d}.parquet"


class RefCache:
    """One cache of per-row reference log-probs for one set of inputs (see the module docstring)."""

    def __init__(self, filesystem: pafs.FileSystem, path: str, uri: str, manifest: dict):
        self._fs = filesystem
        self._path = path  # the cache directory, as a path of self._fs
        self.uri = uri
        self.manifest = manifest
        self.fingerprint: str = manifest["fingerprint"]
        self.parts: dict[str, str] = dict(manifest["parts"])
        self.num_rows: int = manifest["num_rows"]
        self.roles: list[str] = list(manifest["roles"])
        self.shard_rows: int = manifest["shard_rows"]

    def __repr__(self) -> str:
        return f"RefCache({self.uri!r}, rows={self.num_rows}, roles={self.roles}, shards={len(self.shards())})"

    # ------------------------------------------------------------------------------ opening

    @classmethod
    def open(cls, root: str | os.PathLike, parts: dict[str, str], *, num_rows: int, roles: list[str],
             shard_rows: int = 4096, filesystem: pafs.FileSystem | None = None) -> RefCache:
        """The cache for `parts` under `root` (a local path or URI), created if absent.

        If `root` itself holds a manifest, it is that one cache and must match `parts`. Raises
        RefCacheMismatch when an existing manifest disagrees (naming each differing part).
        `filesystem`: a pyarrow filesystem to use instead of resolving `root` as a URI; `root`
        is then a path inside it. An existing cache keeps the shard_rows it was created with.
        """
        fingerprint = combine(parts)
        roles = _check_roles(roles)
        if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 0:
            raise ValueError(f"num_rows must be an int >= 0, got {num_rows!r}")
        if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
            raise ValueError(f"shard_rows must be an int >= 1, got {shard_rows!r}")
        fs, base, base_uri = _locate(root, filesystem)
        path, uri = base, base_uri
        manifest = _read_manifest(fs, path, uri)
        if manifest is None:  # root is a parent of caches: ours is named by its fingerprint
            path, uri = f"{base}/{fingerprint[:16]}", f"{base_uri}/{fingerprint[:16]}"
            manifest = _read_manifest(fs, path, uri)
        if manifest is not None:
            _check_manifest(manifest, uri, fingerprint, parts, num_rows, roles)
            return cls(fs, path, uri, manifest)
        manifest = _new_manifest(fingerprint, parts, num_rows, roles, shard_rows)
        fs.create_dir(path, recursive=True)
        data = json.dumps(manifest, indent=2).encode()
        _write_then_move(fs, f"{path}/{MANIFEST}", lambda tmp: _write_bytes(fs, tmp, data))  # last writer wins
        return cls(fs, path, uri, manifest)

    @staticmethod
    def nearest(root: str | os.PathLike, parts: dict[str, str], *,
                filesystem: pafs.FileSystem | None = None) -> tuple[str, list[str]] | None:
        """(uri, differing part names) of the cache under `root` that differs least from `parts`.

        For a "miss because <part> changed" message; None if `root` holds no readable cache.
        An empty list means an exact match. `root` itself counts if it holds a manifest.
        """
        check_parts(parts)
        fs, base, base_uri = _locate(root, filesystem)
        candidates = [(base, base_uri)]
        for info in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)):
            if info.type == pafs.FileType.Directory:
                candidates.append((f"{base}/{info.base_name}", f"{base_uri}/{info.base_name}"))
        found = []
        for path, uri in candidates:
            try:
                manifest = _read_manifest(fs, path, uri)
            except RefCacheMismatch:
                continue  # an unreadable manifest is nobody's nearest cache
            if manifest is not None and isinstance(manifest.get("parts"), dict):
                found.append((differing(manifest["parts"], parts), uri))
        if not found:
            return None
        names, uri = min(found, key=lambda f: (len(f[0]), f[1]))
        return uri, names

    # ------------------------------------------------------------------------------ shards

    def shards(self) -> list[Shard]:
        """Every shard, in row order; together they cover [0, num_rows)."""
        return _plan(self.num_rows, self.shard_rows)

    def check(self) -> dict[Shard, str]:
        """Every shard to (re)compute, in row order, with why: ABSENT, or what failed verification
        (one line, e.g. "checksum mismatch: its values changed after it was written").

        Reads every present shard once (see "verification" in the module docstring)."""
        return {shard: why for shard, (_, why) in self._load_all(keep=False).items() if why is not None}

    def missing_shards(self) -> list[Shard]:
        """Shards to (re)compute: absent, or present but failing verification (check() says why)."""
        return list(self.check())

    def is_complete(self) -> bool:
        return not self.check()

    def verify(self) -> None:
        """Raise RefCacheIncomplete, naming each shard and what failed, unless every shard verifies."""
        problems = self.check()
        if problems:
            raise self._incomplete(problems)

    def write_shard(self, shard: Shard, values: dict[str, np.ndarray]) -> None:
        """Store one shard atomically. values: role -> [shard.num_rows] real numbers, finite.

        Values are stored as float32 (log-probs summed over completion tokens, in nats).
        Rewriting a present shard replaces it. Torch tensors are accepted (moved to CPU).
        """
        shards = self.shards()
        if not (0 <= shard.index < len(shards) and shards[shard.index] == shard):
            raise ValueError(f"ref cache {self.uri}: {shard} is not a shard of this cache "
                             f"({self.num_rows} rows in shards of {self.shard_rows}; use cache.shards())")
        columns = _check_values(values, self.roles, shard, self.uri)
        table = pa.table({role: pa.array(columns[role], type=pa.float32()) for role in self.roles})
        footer = {"fingerprint": self.fingerprint, "index": shard.index, "start": shard.start, "stop": shard.stop,
                  "values_sha256": _values_sha256(columns, self.roles)}
        table = table.replace_schema_metadata({_FOOTER_KEY: json.dumps(footer).encode()})
        final = f"{self._path}/{shard.file_name}"
        tmp = _temp_name(final)
        try:
            pq.write_table(table, tmp, filesystem=self._fs)
        except BaseException:
            _delete_quietly(self._fs, tmp)
            raise
        try:
            self._fs.move(tmp, final)
        except OSError:
            _delete_quietly(self._fs, tmp)
            # Another run wrote this shard and removed our temp file as a leftover (below): its
            # file is complete and computed from the same inputs, so the shard is done.
            if self._fs.get_file_info(final).type != pafs.FileType.File:
                raise
        self._remove_leftovers(shard)

    def _remove_leftovers(self, shard: Shard) -> None:
        # Temp files of crashed writes of this shard: superseded now that its final file exists.
        prefix = f".{shard.file_name}."
        for info in self._fs.get_file_info(pafs.FileSelector(self._path, allow_not_found=True)):
            if info.base_name.startswith(prefix) and info.base_name.endswith(".tmp"):
                _delete_quietly(self._fs, f"{self._path}/{info.base_name}")

    # ------------------------------------------------------------------------------ reading

    def read(self) -> dict[str, np.ndarray]:
        """Every role -> float32 [num_rows], in row order, every shard verified as it is read.
        Raises RefCacheIncomplete if a shard is absent or fails verification (naming each)."""
        loaded = self._load_all(keep=True)
        problems = {shard: why for shard, (_, why) in loaded.items() if why is not None}
        if problems:
            raise self._incomplete(problems)
        out = {role: np.empty(self.num_rows, dtype=np.float32) for role in self.roles}
        for shard, (columns, _) in loaded.items():
            for role in self.roles:
                out[role][shard.start:shard.stop] = columns[role]
        return out

    def _load_all(self, keep: bool) -> dict[Shard, tuple[dict[str, np.ndarray] | None, str | None]]:
        """shard -> (its values if `keep` and it verifies, None if it verifies else what failed)."""
        present = set()
        for info in self._fs.get_file_info(pafs.FileSelector(self._path, allow_not_found=True)):
            match = _SHARD_FILE.match(info.base_name)
            if match and info.type == pafs.FileType.File:
                present.add(int(match.group(1)))
        shards = self.shards()
        to_read = [s for s in shards if s.index in present]
        with ThreadPoolExecutor(max_workers=max(1, min(_READERS, len(to_read)))) as pool:
            results = dict(zip(to_read, pool.map(lambda shard: self._load(shard, keep), to_read), strict=True))
        return {shard: results.get(shard, (None, ABSENT)) for shard in shards}

    def _load(self, shard: Shard, keep: bool) -> tuple[dict[str, np.ndarray] | None, str | None]:
        """(role -> values if `keep`, None) if the shard's file verifies, else (None, what failed)."""
        try:
            table = pq.read_table(f"{self._path}/{shard.file_name}", filesystem=self._fs)
        except (OSError, pa.ArrowException) as e:
            return None, f"unreadable, truncated or not Parquet ({_first_line(e)})"
        try:
            footer = json.loads((table.schema.metadata or {})[_FOOTER_KEY])
        except (KeyError, ValueError):
            return None, "not written by prefopt.refcache (no footer metadata)"
        if not isinstance(footer, dict):
            return None, "not written by prefopt.refcache (footer metadata is not a JSON object)"
        expected = {"fingerprint": self.fingerprint, "index": shard.index, "start": shard.start, "stop": shard.stop}
        held = {k: footer.get(k) for k in expected}
        if held != expected:
            return None, f"holds {held}, expected {expected} (copied from another cache?)"
        if table.num_rows != shard.num_rows:
            return None, f"{table.num_rows} rows, expected {shard.num_rows}"
        for role in self.roles:
            if role not in table.column_names or table.schema.field(role).type != pa.float32():
                return None, f"no float32 column {role!r} (columns {table.column_names})"
        columns = {role: table[role].to_numpy() for role in self.roles}
        recorded = footer.get("values_sha256")
        # A shard of the previous version (no checksum) is recomputed rather than trusted: its
        # values cannot be told from changed ones, and recomputing costs one reference pass.
        if not isinstance(recorded, str):
            return None, "no checksum (written before prefopt recorded checksums): cannot be verified"
        if _values_sha256(columns, self.roles) != recorded:
            return None, "checksum mismatch: its values changed after it was written"
        return (columns if keep else None), None

    def _incomplete(self, problems: dict[Shard, str]) -> RefCacheIncomplete:
        shown = "; ".join(f"{s.file_name} (rows {s.start}..{s.stop - 1}): {why}" for s, why in list(problems.items())[:5])
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        return RefCacheIncomplete(
            f"ref cache {self.uri} is incomplete: {len(problems)} of {len(self.shards())} shards to compute "
            f"({shown}{more}); run the reference precompute again to compute them")


# ================================================================================= helpers


def _locate(root: str | os.PathLike, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str, str]:
    """-> (filesystem, path inside it, uri to show) of a local path or URI."""
    root = os.fspath(root)
    if filesystem is not None:
        return filesystem, root.rstrip("/"), root.rstrip("/")
    if "://" in root:
        fs, path = pafs.FileSystem.from_uri(root)
        return fs, path.rstrip("/"), root.rstrip("/")
    path = os.path.abspath(os.path.expanduser(root))  # from_uri wants absolute local paths
    return pafs.LocalFileSystem(), path, path


def _check_roles(roles: list[str]) -> list[str]:
    roles = list(roles)
    if not roles or any(not isinstance(r, str) or not r for r in roles) or len(set(roles)) != len(roles):
        raise ValueError(f"roles must be distinct non-empty column names, e.g. ['chosen', 'rejected'], got {roles}")
    return roles


def _new_manifest(fingerprint: str, parts: dict[str, str], num_rows: int, roles: list[str], shard_rows: int) -> dict:
    def version(package: str) -> str | None:
        try:
            return metadata.version(package)  # without importing torch: it takes seconds
        except metadata.PackageNotFoundError:
            return None

    from prefopt import __version__

    manifest = {"format": CACHE_VERSION, "fingerprint": fingerprint, "parts": dict(parts),
                "num_rows": num_rows, "roles": roles, "values_dtype": VALUES_DTYPE, "shard_rows": shard_rows,
                "versions": {"prefopt": __version__, "torch": version("torch"),
                             "transformers": version("transformers"), "pyarrow": pa.__version__},
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    manifest["shards"] = [{"index": s.index, "file": s.file_name, "start": s.start, "stop": s.stop,
                           "num_rows": s.num_rows} for s in _plan(num_rows, shard_rows)]
    return manifest


def _plan(num_rows: int, shard_rows: int) -> list[Shard]:
    return [Shard(i, start, min(start + shard_rows, num_rows)) for i, start in enumerate(range(0, num_rows, shard_rows))]


def _read_manifest(fs: pafs.FileSystem, path: str, uri: str) -> dict | None:
    """The manifest in directory `path`, None if there is none; RefCacheMismatch if unreadable."""
    file = f"{path}/{MANIFEST}"
    if fs.get_file_info(file).type != pafs.FileType.File:
        return None
    try:
        with fs.open_input_stream(file) as f:
            manifest = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise RefCacheMismatch(f"ref cache {uri}: unreadable {MANIFEST} ({e}); delete the directory") from e
    if not isinstance(manifest, dict):
        raise RefCacheMismatch(f"ref cache {uri}: {MANIFEST} is not a JSON object; delete the directory")
    return manifest


def _check_manifest(manifest: dict, uri: str, fingerprint: str, parts: dict, num_rows: int, roles: list[str]) -> None:
    old_parts = manifest.get("parts")
    if not isinstance(old_parts, dict):
        raise RefCacheMismatch(f"ref cache {uri}: {MANIFEST} has no parts; delete the directory")
    names = differing(old_parts, parts)
    if names:
        said = ", ".join(f"{k} differs (cached {_short(old_parts.get(k))} vs now {_short(parts.get(k))})"
                         for k in names)
        raise RefCacheMismatch(f"ref cache {uri} was computed for other inputs: {said}", names)
    if manifest.get("fingerprint") != fingerprint:
        raise RefCacheMismatch(
            f"ref cache {uri}: same parts but fingerprint {_short(manifest.get('fingerprint'))} vs "
            f"{_short(fingerprint)} (written as format {manifest.get('format')!r}, now {CACHE_VERSION!r}, "
            f"or a corrupted {MANIFEST}); delete the directory")
    # Same inputs imply the same rows and roles; a difference means a corrupted manifest or a
    # collision of the 16 hex digits naming the directory.
    if manifest.get("num_rows") != num_rows:
        raise RefCacheMismatch(f"ref cache {uri} holds {manifest.get('num_rows')} rows, the data has {num_rows} "
                               f"(corrupted {MANIFEST}?); delete the directory")
    old_roles = manifest.get("roles")
    if not isinstance(old_roles, list) or sorted(map(str, old_roles)) != sorted(roles):
        raise RefCacheMismatch(f"ref cache {uri} holds roles {old_roles}, asked for {roles} "
                               f"(corrupted {MANIFEST}?); delete the directory")
    shard_rows = manifest.get("shard_rows")
    if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
        raise RefCacheMismatch(f"ref cache {uri}: {MANIFEST} has shard_rows {shard_rows!r}; delete the directory")


def _check_values(values: dict, roles: list[str], shard: Shard, uri: str) -> dict[str, np.ndarray]:
    """-> role -> float32 [shard.num_rows]; ValueError naming the role and row of a bad value."""
    where = f"ref cache {uri}: shard {shard.index} (rows {shard.start}..{shard.stop - 1})"
    missing = [r for r in roles if r not in values]
    extra = [k for k in values if k not in roles]
    if missing or extra:
        raise ValueError(f"{where}: roles {sorted(values)} given, expected {roles} "
                         f"(missing {missing}, unexpected {extra})")
    out = {}
    for role in roles:
        value = values[role]
        if hasattr(value, "detach"):  # a torch tensor, possibly bf16 or on a GPU
            value = value.detach().float().cpu().numpy()
        given = np.asarray(value)
        if given.dtype.kind not in "fiu":
            raise ValueError(f"{where}: {role!r} has dtype {given.dtype}, expected real numbers (stored as float32)")
        if given.shape != (shard.num_rows,):
            raise ValueError(f"{where}: {role!r} has shape {given.shape}, expected ({shard.num_rows},)")
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, reported below
            array = given.astype(np.float32)
        bad = np.flatnonzero(~np.isfinite(array))
        if bad.size:
            more = f" and {bad.size - 1} more rows" if bad.size > 1 else ""
            raise ValueError(f"{where}: {role!r} is not finite in float32 at row {shard.start + bad[0]} "
                             f"(value {given[bad[0]]!r}){more}")
        out[role] = array
    return out


def _temp_name(final: str) -> str:
    # Unique per writer, hidden, beside the final name (a move within one directory).
    parent, name = final.rsplit("/", 1)
    return f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"


def _delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    with contextlib.suppress(OSError):  # absent, or left for the next writer to remove
        fs.delete_file(path)


def _write_then_move(fs: pafs.FileSystem, final: str, write) -> None:
    """write(tmp) a file under a temporary name, then move it to `final`."""
    tmp = _temp_name(final)
    try:
        write(tmp)
        fs.move(tmp, final)
    except BaseException:
        _delete_quietly(fs, tmp)
        raise


def _write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)


def _values_sha256(columns: dict[str, np.ndarray], roles: list[str]) -> str:
    # Of the values, not of the file's bytes: the checksum must live inside the shard's own file
    # (its footer), so that shard and checksum appear together with the one atomic move and no
    # manifest is updated by several writers; a file cannot hold the hash of its own bytes. The
    # values are what the cache promises: bytes changed elsewhere (statistics) change nothing read.
    h = hashlib.sha256()
    for role in roles:
        h.update(role.encode() + b"\0")
        h.update(np.ascontiguousarray(columns[role], dtype="<f4").tobytes())
    return h.hexdigest()


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= 16 else text[:12] + ".."

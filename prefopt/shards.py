"""A sharded data set on any store (`prefopt.storage.Store`: local, s3://, gs://, ...): Parquet
shards plus a manifest. The reference cache, the generated samples and the score cache are each one.

Layout of one data set, a directory:
    manifest.json                       what the data depends on (fingerprint, decisive inputs) and
                                        the shard plan: [{index, file, start, stop, num_rows}, ...]
    shard-00000.parquet                 rows [start, stop) of the data
    .shard-00000.parquet.<uuid>.tmp     a write in progress, or left by a crash: never read

A shard is written if and only if a file of its name exists and verifies: it parses as Parquet,
its footer (key-value metadata under the data set's `kind`) names this fingerprint and these rows,
it has the rows and typed columns expected, and its values hash to the `values_sha256` recorded in
that footer when it was written. Anything else is damaged: `check()` says why in one line, and the
shard is listed by `missing()` to be recomputed, never read.

Why the checksum lives in the shard's own footer and not in the manifest: the shard and its
checksum then appear together, with one atomic move; the manifest is written once, never updated
after each shard (so a killed writer leaves nothing half-recorded, and two writers never race on
it); and a shard copied into another directory of the same data set carries its proof along. A
file cannot hold the hash of its own bytes, so the hash is of the values (per column: its name,
then its values), which is also what a reader is promised.

Why a final name always holds a complete file: it is only ever made by `fs.move(tmp, final)`
after `pq.write_table` wrote and closed the whole temporary file. On a local disk a move is
rename(2); on an object store a server-side copy, visible only once complete. (A pyarrow output
stream closed while an exception unwinds completes the upload with what it has: the temporary
name confines such a truncated object to a name nobody reads.) Temporary names start with "." so
that pyarrow.dataset, Spark and Hive skip them too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from prefopt.errors import UserError
from prefopt.storage import Store

MANIFEST = "manifest.json"
ABSENT = "absent"  # check()'s reason for a shard that has no file yet
# Shards read at once while verifying: an object store answers each read in tens of ms.
_READERS = 8


class ManifestError(UserError, ValueError):
    """A manifest that cannot be read; the message names it."""


@dataclass(frozen=True)
class Shard:
    """Rows [start, stop) of a data set. `digits`: of the index in the file name."""

    index: int
    start: int
    stop: int
    digits: int = field(default=6, compare=False, repr=False)

    @property
    def num_rows(self) -> int:
        return self.stop - self.start

    @property
    def file_name(self) -> str:
        return f"shard-{self.index:0{self.digits}d}.parquet"


def plan(num_rows: int, shard_rows: int, digits: int = 6) -> list[Shard]:
    """Rows [0, num_rows) cut into shards of shard_rows (the last one shorter)."""
    return [Shard(i, start, min(start + shard_rows, num_rows), digits)
            for i, start in enumerate(range(0, num_rows, shard_rows))]


def plan_entries(shards: list[Shard]) -> list[dict]:
    """The shard plan as the manifest records it."""
    return [{"index": s.index, "file": s.file_name, "start": s.start, "stop": s.stop, "num_rows": s.num_rows}
            for s in shards]


def read_manifest(store: Store) -> dict | None:
    """The manifest of the data set at `store`; None if there is none; ManifestError if unreadable."""
    file = store / MANIFEST
    try:
        manifest = json.loads(file.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{file}: unreadable {MANIFEST} ({_first_line(exc)})") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{file}: {MANIFEST} is not a JSON object")
    return manifest


def write_manifest(store: Store, manifest: dict) -> None:
    (store / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def differing(old: dict, new: dict, keys) -> list[str]:
    """The keys among `keys` whose values differ between two manifests."""
    return [k for k in keys if old.get(k) != new.get(k)]


def values_sha256(table: pa.Table) -> str:
    """Hex sha256 of a table's values: per column, in order, its name then its values (fixed-width
    numbers as little-endian bytes, anything else as JSON)."""
    h = hashlib.sha256()
    for name, column in zip(table.column_names, table.columns, strict=True):
        h.update(name.encode() + b"\0")
        kind = column.type
        if (pa.types.is_floating(kind) or pa.types.is_integer(kind) or pa.types.is_boolean(kind)) \
                and column.null_count == 0:
            values = column.to_numpy()
            h.update(np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<")).tobytes())
        else:
            h.update(json.dumps(column.to_pylist(), ensure_ascii=False).encode())
    return h.hexdigest()


class Dataset:
    """The shards of one data set at `store` (see the module docstring).

    kind: the footer's key and the writer's name in messages ("prefopt.refcache", ...);
    fingerprint: of everything the data depends on; shards: the plan; schema: the columns every
    shard has, in order, with their types (None: whatever a shard holds)."""

    def __init__(self, store: Store, kind: str, fingerprint: str, shards: list[Shard],
                 schema: pa.Schema | None = None):
        self.store, self.kind, self.fingerprint = store, kind, fingerprint
        self.shards, self.schema = list(shards), schema
        self.manifest: dict | None = None  # as read or written, when the data set was opened from one

    @classmethod
    def from_manifest(cls, store: Store, kind: str, manifest: dict, schema: pa.Schema | None = None) -> Dataset:
        """The data set a manifest describes (its `fingerprint` and its `shards` plan)."""
        shards = [Shard(s["index"], s["start"], s["stop"], len(s["file"]) - len("shard-.parquet"))
                  for s in manifest["shards"]]
        dataset = cls(store, kind, manifest["fingerprint"], shards, schema)
        dataset.manifest = manifest
        return dataset

    # ------------------------------------------------------------------------------ writing

    def write(self, shard: Shard, table: pa.Table) -> None:
        """Store one shard atomically, its checksum in its footer. Rewriting a shard replaces it."""
        if self.schema is not None:
            table = table.select(self.schema.names).cast(self.schema)
        if table.num_rows != shard.num_rows:
            raise ValueError(f"{self.store / shard.file_name}: {table.num_rows} rows given, the shard has "
                             f"{shard.num_rows}")
        footer = {"fingerprint": self.fingerprint, "index": shard.index, "start": shard.start, "stop": shard.stop,
                  "values_sha256": values_sha256(table)}
        table = table.replace_schema_metadata({self.kind.encode(): json.dumps(footer).encode()})
        fs, final = self.store.fs, (self.store / shard.file_name).path
        parent, name = final.rsplit("/", 1)
        tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"  # unique per writer: two never interleave bytes
        fs.create_dir(parent, recursive=True)
        try:
            pq.write_table(table, tmp, filesystem=fs)
        except BaseException:
            _delete_quietly(fs, tmp)
            raise
        try:
            fs.move(tmp, final)
        except OSError:
            _delete_quietly(fs, tmp)
            # Another writer of the same inputs finished this shard and removed our temp file as
            # a leftover (below): its file is complete, so the shard is done.
            if fs.get_file_info(final).type != pafs.FileType.File:
                raise
        self._remove_leftovers(shard)

    def _remove_leftovers(self, shard: Shard) -> None:
        # Temp files of crashed writes of this shard: superseded now that its final file exists.
        prefix = f".{shard.file_name}."
        for name in self.store.children():
            if name.startswith(prefix) and name.endswith(".tmp"):
                _delete_quietly(self.store.fs, (self.store / name).path)

    # ------------------------------------------------------------------------------ reading

    def load(self, shard: Shard) -> tuple[pa.Table | None, str | None]:
        """(its table, None) if the shard's file verifies, else (None, what failed, in one line)."""
        try:
            table = pq.read_table((self.store / shard.file_name).path, filesystem=self.store.fs)
        except FileNotFoundError:
            return None, ABSENT
        except (OSError, pa.ArrowException) as exc:
            return None, f"unreadable, truncated or not Parquet ({_first_line(exc)})"
        try:
            footer = json.loads((table.schema.metadata or {})[self.kind.encode()])
        except (KeyError, ValueError):
            return None, f"not written by {self.kind} (no footer metadata)"
        if not isinstance(footer, dict):
            return None, f"not written by {self.kind} (footer metadata is not a JSON object)"
        expected = {"fingerprint": self.fingerprint, "index": shard.index, "start": shard.start, "stop": shard.stop}
        held = {k: footer.get(k) for k in expected}
        if held != expected:
            return None, f"holds {held}, expected {expected} (copied from another cache?)"
        if table.num_rows != shard.num_rows:
            return None, f"{table.num_rows} rows, expected {shard.num_rows}"
        if self.schema is not None:
            for want in self.schema:
                if want.name not in table.column_names or table.schema.field(want.name).type != want.type:
                    return None, f"no {_type_name(want.type)} column {want.name!r} (columns {table.column_names})"
            table = table.select(self.schema.names)
        recorded = footer.get("values_sha256")
        # A shard without a checksum cannot be told from a changed one: recomputed, not trusted.
        if not isinstance(recorded, str):
            return None, "no checksum (written before prefopt recorded checksums): cannot be verified"
        if values_sha256(table) != recorded:
            return None, "checksum mismatch: its values changed after it was written"
        return table.replace_schema_metadata(None), None

    def load_all(self, shards: list[Shard] | None = None) -> dict[Shard, tuple[pa.Table | None, str | None]]:
        """load() of each shard (every shard of the plan by default), a few at a time; the absent
        ones (by listing) are not read."""
        shards = self.shards if shards is None else shards
        present = set(self.store.children())
        to_read = [s for s in shards if s.file_name in present]
        with ThreadPoolExecutor(max_workers=max(1, min(_READERS, len(to_read)))) as pool:
            loaded = dict(zip(to_read, pool.map(self.load, to_read), strict=True))
        return {shard: loaded.get(shard, (None, ABSENT)) for shard in shards}

    def check(self) -> dict[Shard, str]:
        """Every shard to (re)compute, in plan order, with why: ABSENT, or what failed verification."""
        return {shard: why for shard, (_, why) in self.load_all().items() if why is not None}

    def missing(self) -> list[Shard]:
        """Shards to (re)compute: absent, or present but damaged (check() says why)."""
        return list(self.check())


def _type_name(kind: pa.DataType) -> str:
    return {pa.float32(): "float32", pa.float64(): "float64"}.get(kind, str(kind))


def _delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    with contextlib.suppress(OSError):  # absent, or left for the next writer to remove
        fs.delete_file(path)


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]

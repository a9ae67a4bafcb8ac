"""Reference log-probs on any pyarrow filesystem: a sharded data set (`prefopt.shards`).

Layout of one cache, `<root>/<fingerprint[:16]>/`:
    manifest.json                       fingerprint, parts, roles, rows, shards, versions (metadata only)
    shard-000000.parquet                rows [0, shard_rows): one float32 column per role
    shard-000001.parquet                rows [shard_rows, 2 * shard_rows), ...
    .shard-000001.parquet.<uuid>.tmp    a write in progress, or left by a crash: never read

A shard is written if and only if a file with its final name exists and verifies; presence comes
from listing the directory, never from the manifest, so nothing needs updating after a shard.
How a shard is written atomically (on object stores too), and what verification checks (its
footer names this cache and these rows, its row count and float32 columns, and `values_sha256`, a
sha256 of its values per role: the role name, then its float32 little-endian bytes), is said once,
in `prefopt.shards`. A shard that fails is treated as missing: `check()` says why in one line per
shard, `missing_shards()` includes it so that it is recomputed (overwritten), and `read()` refuses
the cache. Verifying reads every shard once (a few bytes per row, with a few threads): `check()`
on the controller when it decides what to compute, and `read()` on each rank as it reads anyway.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from importlib import metadata

import numpy as np
import pyarrow as pa
from pyarrow import fs as pafs

from prefopt import shards
from prefopt.errors import UserError
from prefopt.refcache.fingerprint import CACHE_VERSION, check_parts, combine, differing
from prefopt.shards import ABSENT, MANIFEST, Shard  # noqa: F401  (part of this module's API)
from prefopt.storage import Store

VALUES_DTYPE = "float32"
KIND = "prefopt.refcache"  # the shards' footer key: which cache and rows a shard holds


class RefCacheMismatch(UserError, ValueError):
    """A cache exists where one was asked for, but for other inputs. `differing`: part names."""

    def __init__(self, message: str, differing: list[str] | None = None):
        super().__init__(message)
        self.differing = differing or []


class RefCacheIncomplete(UserError, RuntimeError):
    """read() of a cache that still has shards to compute: absent, or failing verification."""


class RefCache:
    """One cache of per-row reference log-probs for one set of inputs (see the module docstring)."""

    def __init__(self, filesystem: pafs.FileSystem, path: str, uri: str, manifest: dict):
        self.uri = uri
        self.manifest = manifest
        self.fingerprint: str = manifest["fingerprint"]
        self.parts: dict[str, str] = dict(manifest["parts"])
        self.num_rows: int = manifest["num_rows"]
        self.roles: list[str] = list(manifest["roles"])
        self.shard_rows: int = manifest["shard_rows"]
        schema = pa.schema([pa.field(role, pa.float32()) for role in self.roles])
        self._data = shards.Dataset(Store(uri, filesystem, path), KIND, self.fingerprint,
                                    shards.plan(self.num_rows, self.shard_rows), schema)

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
        store = _locate(root, filesystem)
        manifest = _read_manifest(store)
        if manifest is None:  # root is a parent of caches: ours is named by its fingerprint
            store = store / fingerprint[:16]
            manifest = _read_manifest(store)
        if manifest is not None:
            _check_manifest(manifest, store.uri, fingerprint, parts, num_rows, roles)
            return cls(store.fs, store.path, store.uri, manifest)
        manifest = _new_manifest(fingerprint, parts, num_rows, roles, shard_rows)
        shards.write_manifest(store, manifest)  # last writer wins: same inputs, same manifest
        return cls(store.fs, store.path, store.uri, manifest)

    @staticmethod
    def nearest(root: str | os.PathLike, parts: dict[str, str], *,
                filesystem: pafs.FileSystem | None = None) -> tuple[str, list[str]] | None:
        """(uri, differing part names) of the cache under `root` that differs least from `parts`.

        For a "miss because <part> changed" message; None if `root` holds no readable cache.
        An empty list means an exact match. `root` itself counts if it holds a manifest.
        """
        check_parts(parts)
        base = _locate(root, filesystem)
        candidates = [base]
        for info in base.fs.get_file_info(pafs.FileSelector(base.path, allow_not_found=True)):
            if info.type == pafs.FileType.Directory:
                candidates.append(base / info.base_name)
        found = []
        for store in candidates:
            try:
                manifest = _read_manifest(store)
            except RefCacheMismatch:
                continue  # an unreadable manifest is nobody's nearest cache
            if manifest is not None and isinstance(manifest.get("parts"), dict):
                found.append((differing(manifest["parts"], parts), store.uri))
        if not found:
            return None
        names, uri = min(found, key=lambda f: (len(f[0]), f[1]))
        return uri, names

    # ------------------------------------------------------------------------------ shards

    def shards(self) -> list[Shard]:
        """Every shard, in row order; together they cover [0, num_rows)."""
        return list(self._data.shards)

    def check(self) -> dict[Shard, str]:
        """Every shard to (re)compute, in row order, with why: ABSENT, or what failed verification
        (one line, e.g. "checksum mismatch: its values changed after it was written").

        Reads every present shard once (see "verification" in prefopt.shards)."""
        return self._data.check()

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
        if not (0 <= shard.index < len(self._data.shards) and self._data.shards[shard.index] == shard):
            raise ValueError(f"ref cache {self.uri}: {shard} is not a shard of this cache "
                             f"({self.num_rows} rows in shards of {self.shard_rows}; use cache.shards())")
        columns = _check_values(values, self.roles, shard, self.uri)
        self._data.write(shard, pa.table({role: pa.array(columns[role], type=pa.float32()) for role in self.roles}))

    # ------------------------------------------------------------------------------ reading

    def read(self) -> dict[str, np.ndarray]:
        """Every role -> float32 [num_rows], in row order, every shard verified as it is read.
        Raises RefCacheIncomplete if a shard is absent or fails verification (naming each)."""
        loaded = self._data.load_all()
        problems = {shard: why for shard, (_, why) in loaded.items() if why is not None}
        if problems:
            raise self._incomplete(problems)
        out = {role: np.empty(self.num_rows, dtype=np.float32) for role in self.roles}
        for shard, (table, _) in loaded.items():
            for role in self.roles:
                out[role][shard.start:shard.stop] = table[role].to_numpy()
        return out

    def _incomplete(self, problems: dict[Shard, str]) -> RefCacheIncomplete:
        shown = "; ".join(f"{s.file_name} (rows {s.start}..{s.stop - 1}): {why}" for s, why in list(problems.items())[:5])
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        return RefCacheIncomplete(
            f"ref cache {self.uri} is incomplete: {len(problems)} of {len(self.shards())} shards to compute "
            f"({shown}{more}); run the reference precompute again to compute them")


# ================================================================================= helpers


def _locate(root: str | os.PathLike, filesystem: pafs.FileSystem | None) -> Store:
    """The store of a local path or URI (or of a path inside `filesystem`)."""
    root = os.fspath(root)
    if filesystem is not None:
        return Store(root.rstrip("/"), filesystem, root.rstrip("/"))
    if "://" in root:  # as given (file:// too): the uri shown is the one the user wrote
        fs, path = pafs.FileSystem.from_uri(root)
        return Store(root.rstrip("/"), fs, path.rstrip("/"))
    return Store.at(root)


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

    return {"format": CACHE_VERSION, "fingerprint": fingerprint, "parts": dict(parts),
            "num_rows": num_rows, "roles": roles, "values_dtype": VALUES_DTYPE, "shard_rows": shard_rows,
            "versions": {"prefopt": __version__, "torch": version("torch"),
                         "transformers": version("transformers"), "pyarrow": pa.__version__},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "shards": shards.plan_entries(shards.plan(num_rows, shard_rows))}


def _read_manifest(store: Store) -> dict | None:
    """The manifest in directory `store`, None if there is none; RefCacheMismatch if unreadable."""
    try:
        return shards.read_manifest(store)
    except shards.ManifestError as e:
        raise RefCacheMismatch(f"ref cache {store.uri}: {str(e).removeprefix(f'{store / MANIFEST}: ')}; "
                               "delete the directory") from e


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


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= 16 else text[:12] + ".."

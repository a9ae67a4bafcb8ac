"""A source cut into parts of `data.part_rows` rows, each read, validated and tokenized alone.

Why parts: the driver then holds a few parts at a time, whatever the corpus size, and parts
run in parallel processes. A part's output is a function of its rows and the settings only, and
parts are cut by row count (never by the number of CPUs), so the prepared data is the same bytes
whatever the parallelism.

Read in parts straight from the file: JSON Lines and Parquet files. Every other source (one JSON
array, CSV, a datasets directory, a built-in task, or any source with `data.num_examples`) is
read whole, as before, and its rows are cut into parts in memory.

The format is decided from the first part (its columns, its first values); a later part with a
column that format does not read is an error naming the column and its first row, as such a
column is anywhere in a source read whole.

On disk (prefopt.data.prepare gives a directory named by the source file, its size and mtime,
and every setting): part-000000.arrow holds the part's tokenized rows, part-000000.json its
report (rows read, every problem, truncations) and the sha256 of the .arrow. The .json is
written last, each file under a temporary name and then renamed: a part is done when its .json
is there and the .arrow's hash matches it. A preparation killed partway keeps its finished
parts; started again, it prepares only the others.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyarrow as pa

from prefopt.config import DataConfig
from prefopt.data.errors import DataError, Problem
from prefopt.data.formats import COLUMNS, FormatSpec, resolve_format
from prefopt.data.sources import Source, from_table, parse_json, read_source, refuse_utf16
from prefopt.storage import Store

_SCAN_BYTES = 16 << 20  # a JSONL file is scanned for line ends this much at a time
# data.num_proc null: below this many parts to prepare, the calling process does them (its
# tokenizer's threads on every core) rather than start worker processes, whose start-up
# (2-3 s: torch, transformers, the tokenizer) costs about three parts (benchmarks/data_prepare.py).
PARTS_WORTH_PROCESSES = 16
_STREAMED = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


@dataclass(frozen=True)
class PartRef:
    """Where part `index` lies: bytes [start, stop) of a JSONL file, else rows [start, stop)."""

    index: int
    first_row: int  # the 1-based number of its first line or row
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"part-{self.index:06d}"


@dataclass(frozen=True)
class Settings:
    """What preparing a part needs besides its rows (shipped once to each worker process)."""

    name: str  # the source, as messages quote it
    row_word: str
    spec: FormatSpec
    assistant_marker: str
    max_length: int
    max_prompt_length: int
    ignore_columns: tuple[str, ...]


@dataclass
class PartResult:
    index: int
    num_rows: int  # kept
    rows_read: int
    problems: list[Problem]
    truncated: dict[str, int]
    table: pa.Table | None = None  # None when it lies on disk (load_table)


@dataclass
class SourcePlan:
    settings: Settings
    parts: list[PartRef]
    kind: str  # jsonl | parquet | rows
    path: Path | None = None
    source: Source | None = None  # kind rows: the source read whole
    identity: dict | None = None  # a file read in parts: what names it (path, size, mtime)

    def payloads(self, refs: list[PartRef]) -> Iterator[tuple[PartRef, object]]:
        """The rows of each part in `refs` (in plan order): bytes, an Arrow table, or a Source."""
        if self.kind == "jsonl":
            with self.path.open("rb") as f:
                for ref in refs:
                    f.seek(ref.start)
                    yield ref, f.read(ref.stop - ref.start)
        elif self.kind == "parquet":
            wanted = {ref.index: ref for ref in refs}
            for ref, table in _parquet_parts(self.path, self.parts):
                if ref.index in wanted:
                    yield ref, table
        else:
            for ref in refs:
                yield ref, _rows_part(self.source, ref)


def plan_source(cfg: DataConfig, part_rows: int) -> SourcePlan:
    """Cut `cfg`'s source into parts and decide its format (from the first part when streamed)."""
    path = Path(cfg.path).expanduser() if cfg.path is not None else None
    kind = _STREAMED.get(path.suffix.lower()) if path is not None and path.is_file() else None
    if kind == "jsonl":
        refuse_utf16(path)
        if _starts_with_array(path):
            kind = None
    if kind is None or cfg.num_examples is not None:
        source = read_source(cfg)
        spec = resolve_format(source, cfg.format, cfg.ignore_columns)
        starts = range(0, max(len(source.rows), 1), part_rows)
        parts = [PartRef(i, source.rows[s][0] if source.rows else 1, s, min(s + part_rows, len(source.rows)))
                 for i, s in enumerate(starts)]
        return SourcePlan(_settings(cfg, source, spec), parts, "rows", source=source)

    stat = path.stat()
    identity = {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if kind == "jsonl":
        parts = _jsonl_parts(path, part_rows)
        with path.open("rb") as f:
            f.seek(parts[0].start)
            first = parse_json(str(path), f.read(parts[0].stop - parts[0].start), parts[0].first_row)
    else:
        parts, first = _parquet_plan(path, part_rows)
    spec = resolve_format(first, cfg.format, cfg.ignore_columns)
    return SourcePlan(_settings(cfg, first, spec), parts, kind, path=path, identity=identity)


def _settings(cfg: DataConfig, source: Source, spec: FormatSpec) -> Settings:
    return Settings(source.name, source.row_word, spec, cfg.assistant_marker, cfg.max_length,
                    cfg.max_prompt_length, tuple(cfg.ignore_columns))


def _starts_with_array(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(4096).removeprefix(codecs.BOM_UTF8).lstrip()
    return head.startswith(b"[")


def _jsonl_parts(path: Path, part_rows: int) -> list[PartRef]:
    """Parts of part_rows lines each (cut after a \\n), numbered as splitlines counts lines:
    \\n, \\r\\n and a lone \\r each end one."""
    size = path.stat().st_size
    cuts: list[tuple[int, int]] = []  # (byte offset after the cut, lines before it)
    with path.open("rb") as f:
        start = len(codecs.BOM_UTF8) if f.read(3) == codecs.BOM_UTF8 else 0
        f.seek(start)
        offset, newlines, lone_cr, pending_cr = start, 0, 0, False
        while block := f.read(_SCAN_BYTES):
            a = np.frombuffer(block, dtype=np.uint8)
            if pending_cr and a[0] != 10:  # the last block's final \r ended a line alone
                lone_cr += 1
            cr = np.flatnonzero(a == 13)
            after = cr + 1
            inside = after < len(a)
            lone = cr[inside][a[after[inside]] != 10]
            pending_cr = bool(len(cr)) and not inside[-1]
            nl = np.flatnonzero(a == 10)
            # every part_rows-th newline of the file closes a part
            first = (-newlines - 1) % part_rows
            for i in range(first, len(nl), part_rows):
                lines = newlines + i + 1 + lone_cr + int(np.searchsorted(lone, nl[i]))
                cuts.append((offset + int(nl[i]) + 1, lines))
            newlines += len(nl)
            lone_cr += len(lone)
            offset += len(block)
    bounds = [(start, 0), *[c for c in cuts if c[0] < size], (size, None)]
    return [PartRef(i, lines + 1, s, e)
            for i, ((s, lines), (e, _)) in enumerate(zip(bounds, bounds[1:], strict=False))]


def _parquet_plan(path: Path, part_rows: int) -> tuple[list[PartRef], Source]:
    import pyarrow.parquet as pq

    try:
        num_rows = pq.ParquetFile(path).metadata.num_rows
    except Exception as exc:  # pyarrow raises several types; all mean "not a Parquet file"
        raise DataError(f"{path}: cannot read as Parquet: {exc}") from None
    parts = [PartRef(i, s + 1, s, min(s + part_rows, num_rows))
             for i, s in enumerate(range(0, max(num_rows, 1), part_rows))]
    _, table = next(_parquet_parts(path, parts[:1]))
    return parts, from_table(str(path), table)


def _parquet_parts(path: Path, parts: list[PartRef]) -> Iterator[tuple[PartRef, pa.Table]]:
    """The rows of each part in turn, read batch by batch (never the whole file)."""
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    buffered: list[pa.RecordBatch] = []
    have = 0
    batches = file.iter_batches(batch_size=min(64 << 10, max(p.stop - p.start for p in parts) or 1))
    for ref in parts:
        want = ref.stop - ref.start
        while have < want:
            batch = next(batches, None)
            if batch is None:
                break
            buffered.append(batch)
            have += batch.num_rows
        table = pa.Table.from_batches(buffered, schema=file.schema_arrow)
        yield ref, table.slice(0, want)
        rest = table.slice(want)
        buffered, have = rest.to_batches(), rest.num_rows


def _rows_part(source: Source, ref: PartRef) -> Source:
    """Rows [start, stop) of a source read whole, with the problems of the lines between them."""
    rows = source.rows[ref.start:ref.stop]
    low = rows[0][0] if ref.index > 0 and rows else 0
    high = source.rows[ref.stop][0] if ref.stop < len(source.rows) else None
    problems = [p for p in source.problems
                if (ref.index == 0 or p.row >= low) and (high is None or p.row < high)]
    return Source(source.name, source.columns, rows, problems, source.row_word)


# ------------------------------------------------------------------------------ one part


def prepare_part(ref: PartRef, payload, settings: Settings, tokenizer) -> PartResult:
    """Read, validate and tokenize one part's rows; a pure function of its arguments."""
    from prefopt.data.store import to_table
    from prefopt.data.tokenize import encode
    from prefopt.data.validate import check_rows

    if isinstance(payload, bytes):
        source = parse_json(settings.name, payload, ref.first_row)
    elif isinstance(payload, pa.Table):
        source = from_table(settings.name, payload, ref.first_row)
    else:
        source = payload
    _refuse_new_columns(source, settings)
    spec = settings.spec
    examples, problems = check_rows(source, spec, settings.assistant_marker)
    encoded = encode(examples, spec, source, tokenizer,
                     max_length=settings.max_length, max_prompt_length=settings.max_prompt_length)
    problems = sorted(problems + encoded.problems, key=lambda p: p.row or 0)
    table = to_table(encoded.columns)
    return PartResult(ref.index, table.num_rows, len(source.rows) + len(source.problems), problems,
                      dict(encoded.truncated), table)


def _refuse_new_columns(source: Source, settings: Settings) -> None:
    read = set(COLUMNS[settings.spec.name]) | set(settings.ignore_columns)
    extra = [c for c in source.columns if c not in read]
    if extra:
        row = next(n for n, r in source.rows if any(c in r for c in extra))
        raise DataError(
            f"{settings.name}: extra column(s) {', '.join(extra)} (first in {settings.row_word} {row}) "
            f"not read by format {settings.spec.name} (columns {', '.join(COLUMNS[settings.spec.name])}); "
            "rename them, or list them in data.ignore_columns to drop them")


# ------------------------------------------------------------------------------ on disk


def save_part(parts_dir: Path, ref: PartRef, result: PartResult) -> PartResult:
    """Write a part's table and then its report, each atomically (Store.write_bytes); -> the
    result without its table. The hash is of the bytes written, so the file is not read back."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, result.table.schema) as writer:
        writer.write_table(result.table)
    arrow = sink.getvalue()
    Store.at(parts_dir / f"{ref.name}.arrow").write_bytes(arrow)
    report = {"index": ref.index, "start": ref.start, "stop": ref.stop, "num_rows": result.num_rows,
              "rows_read": result.rows_read, "truncated": result.truncated,
              "problems": [asdict(p) for p in result.problems], "arrow_sha256": hashlib.sha256(arrow).hexdigest()}
    Store.at(parts_dir / f"{ref.name}.json").write_text(json.dumps(report))
    return replace(result, table=None)


def load_part(parts_dir: Path, ref: PartRef) -> PartResult | None:
    """A finished part's report, if its files are there and its table's hash matches; else None."""
    try:
        report = json.loads((parts_dir / f"{ref.name}.json").read_text())
        held = (report["index"], report["start"], report["stop"])
        if held != (ref.index, ref.start, ref.stop) or \
                Store.at(parts_dir / f"{ref.name}.arrow").sha256() != report["arrow_sha256"]:
            return None
        return PartResult(ref.index, report["num_rows"], report["rows_read"],
                          [Problem(**p) for p in report["problems"]], report["truncated"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_table(parts_dir: Path, ref: PartRef) -> pa.Table:
    """A part's table, memory-mapped: its pages are read as used and let go with the table."""
    with pa.memory_map(str(parts_dir / f"{ref.name}.arrow")) as source:
        return pa.ipc.open_file(source).read_all()


# ------------------------------------------------------------------------------ all parts

_worker: dict = {}


def _start_worker(settings: Settings, tokenizer, parts_dir: Path | None) -> None:
    # One process per CPU already: the tokenizer's own threads would only compete with them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(settings=settings, tokenizer=tokenizer, parts_dir=parts_dir)


def _run_one(ref: PartRef, payload, settings: Settings, tokenizer, parts_dir: Path | None) -> PartResult:
    result = prepare_part(ref, payload, settings, tokenizer)
    return save_part(parts_dir, ref, result) if parts_dir is not None else result


def _run_in_worker(ref: PartRef, payload) -> PartResult:
    return _run_one(ref, payload, _worker["settings"], _worker["tokenizer"], _worker["parts_dir"])


def available_cpus() -> int:
    """The CPUs this process may run on (a container's or job's share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run_parts(plan: SourcePlan, tokenizer, *, parts_dir: Path | None, num_proc: int | None,
              progress: Callable[[int, int], None] | None = None) -> tuple[list[PartResult], int]:
    """Every part's result in plan order, and how many were found done in parts_dir.

    parts_dir None: tables are kept in memory (small sources: evaluation prompts, tests).
    num_proc > 1 prepares parts in that many processes, with at most two parts each in flight;
    None: one per available CPU when there are PARTS_WORTH_PROCESSES parts to do, else none.
    """
    progress = progress or (lambda done, total: None)
    results: dict[int, PartResult] = {}
    if parts_dir is not None:
        for ref in plan.parts:
            if (done := load_part(parts_dir, ref)) is not None:
                results[ref.index] = done
    reused = len(results)
    total = len(plan.parts)
    progress(reused, total)
    todo = [ref for ref in plan.parts if ref.index not in results]
    if num_proc is None:
        num_proc = available_cpus() if len(todo) >= PARTS_WORTH_PROCESSES else 1
    payloads = plan.payloads(todo)
    if num_proc <= 1 or len(todo) <= 1:
        for ref, payload in payloads:
            results[ref.index] = _run_one(ref, payload, plan.settings, tokenizer, parts_dir)
            progress(len(results), total)
    else:
        # forkserver, not fork: the driver may hold Ray's and torch's threads. The server imports
        # this module (and torch, which the package's collate needs) once for all workers.
        context = get_context("forkserver")
        context.set_forkserver_preload([__name__])
        with ProcessPoolExecutor(min(num_proc, len(todo)), mp_context=context,
                                 initializer=_start_worker,
                                 initargs=(plan.settings, tokenizer, parts_dir)) as pool:
            pending: set = set()

            def collect(finished) -> None:
                for future in finished:
                    result = future.result()  # a DataError of a part stops the preparation here
                    results[result.index] = result
                    progress(len(results), total)

            try:
                for ref, payload in payloads:
                    pending.add(pool.submit(_run_in_worker, ref, payload))
                    if len(pending) >= 2 * num_proc:
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        collect(finished)
                collect(pending)
            except BrokenProcessPool:
                pool.shutdown(wait=False, cancel_futures=True)
                raise DataError(
                    f"{plan.settings.name}: a process preparing its parts died (out of memory? lower "
                    "data.part_rows or data.num_proc; from a script of your own, call prefopt under "
                    "`if __name__ == '__main__':`, as multiprocessing requires)") from None
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    return [results[ref.index] for ref in plan.parts], reused

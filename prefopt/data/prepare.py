"""The pipeline in one place: read -> format -> validate -> tokenize -> fingerprint -> write once.

    td = prepare(cfg, tokenizer, out_dir)     # controller, once per run
    td = TokenizedData.open(td.path)          # any worker, from the path alone
    rows = td.rows([4, 9, 12])                # its own shard, by position

The source is prepared in parts of `data.part_rows` rows (prefopt.data.parts), in
`data.num_proc` processes, each part written to out_dir/parts-<key> as it completes; the parts
are then streamed into one memory-mapped file. The driver's memory is a few parts', whatever
the corpus size, and the result is the same bytes and fingerprint whatever the parallelism.
The key names the source file (path, size, mtime) and every setting, so a preparation killed
partway prepares only its missing parts when started again, and a finished one is reused.

`data.on_bad_row`: error (default) stops with every problem listed (file, row, field); skip
drops the rows, logs a summary by reason and the first problems, and goes on. Problems of the
whole source (unreadable file, missing or extra columns) always stop. Nothing is written as the
run's data before every row has passed, and the tokenized data is written once per fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from prefopt.config import RunConfig
from prefopt.data.errors import DataError, Problem
from prefopt.data.fingerprint import PIPELINE_VERSION, fingerprint_tables, tokenizer_fingerprint
from prefopt.data.formats import FormatSpec
from prefopt.data.parts import PartResult, SourcePlan, load_table, plan_source, run_parts
from prefopt.data.report import DataReport
from prefopt.data.store import TokenizedData, write_batches
from prefopt.data.tokenize import pad_token_id

log = logging.getLogger("prefopt.data")

OnPart = Callable[[int, int], None]  # called with (parts done, parts in all)


@dataclass
class Checked:
    """The in-memory result of reading, validating and tokenizing (nothing written yet)."""

    spec: FormatSpec
    table: pa.Table
    report: DataReport


@dataclass
class Prepared:
    """Every part prepared: the report, and the tokenized rows part by part (never all at once)."""

    plan: SourcePlan
    results: list[PartResult]
    report: DataReport
    parts_dir: Path | None
    reused: int  # parts found done in parts_dir

    @property
    def spec(self) -> FormatSpec:
        return self.plan.settings.spec

    def tables(self) -> Iterator[pa.Table]:
        for ref, result in zip(self.plan.parts, self.results, strict=True):
            yield result.table if result.table is not None else load_table(self.parts_dir, ref)

    def fingerprint(self, cfg: RunConfig, tokenizer) -> str:
        return fingerprint_tables(self.tables, format=self.spec.name, tokenizer_id=tokenizer_fingerprint(tokenizer),
                                  max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length)


@contextmanager
def progress_bar(console, description: str) -> Iterator[OnPart]:
    """A bar of parts done, for a preparation that takes more than a moment."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(), TextColumn("parts"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def parts_dir_for(cfg: RunConfig, plan: SourcePlan, tokenizer, out_dir: Path) -> Path | None:
    """Where a file's parts are kept, named by the file and every setting; None for sources read whole."""
    if plan.identity is None:
        return None
    data = cfg.data.model_dump(exclude={"on_bad_row", "packing", "heldout_path", "num_proc", "seed", "split"})
    key = {"version": PIPELINE_VERSION, "source": plan.identity, "data": data,
           "tokenizer": tokenizer_fingerprint(tokenizer)}
    return out_dir / f"parts-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}"


def prepare_parts(cfg: RunConfig, tokenizer, out_dir: Path | None = None, progress: OnPart | None = None,
                  plan: SourcePlan | None = None) -> Prepared:
    """Read, validate and tokenize every part (in parallel), whatever `on_bad_row` says; raise only
    for whole-source problems. With out_dir, parts go to disk (and are reused from there)."""
    plan = plan or plan_source(cfg.data, cfg.data.part_rows)
    parts_dir = parts_dir_for(cfg, plan, tokenizer, Path(out_dir)) if out_dir is not None else None
    results, reused = run_parts(plan, tokenizer, parts_dir=parts_dir, num_proc=cfg.data.num_proc, progress=progress)
    problems = [p for r in results for p in r.problems]
    truncated: Counter = Counter()
    for r in results:
        truncated.update(r.truncated)
    report = DataReport.build(plan.settings.name, plan.settings.spec.name, sum(r.rows_read for r in results),
                              sum(r.num_rows for r in results), problems, truncated)
    if reused:
        log.info("data: %d of %d parts reused from %s", reused, len(plan.parts), parts_dir)
    return Prepared(plan, results, report, parts_dir, reused)


def check(cfg: RunConfig, tokenizer) -> Checked:
    """Run every check and tokenize in memory (small sources: prompts, tests); see prepare_parts."""
    prepared = prepare_parts(cfg, tokenizer)
    table = pa.concat_tables(list(prepared.tables()))  # a plan has one part at least
    return Checked(prepared.spec, table, prepared.report)


# A finished preparation leaves, inside the tokenized data it wrote, a record named by its parts
# directory's key: the next preparation of the same file and settings finds it there and reads nothing.
_RECORDS = "prepared_from"


def _prepared_before(parts_dir: Path | None) -> tuple[TokenizedData, DataReport] | None:
    """The tokenized data a finished preparation of the same file and settings wrote, if still there."""
    if parts_dir is None:
        return None
    for record_file in parts_dir.parent.glob(f"tokenized-*/{_RECORDS}/{parts_dir.name}.json"):
        try:
            fields = json.loads(record_file.read_text())
            report = DataReport(**{**fields, "problems": [Problem(**p) for p in fields["problems"]]})
            return TokenizedData.open(record_file.parent.parent), report
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _record(parts_dir: Path, tokenized: Path, report: DataReport) -> None:
    (tokenized / _RECORDS).mkdir(exist_ok=True)
    fields = asdict(report) | {"problems": [asdict(p) for p in report.problems]}
    (tokenized / _RECORDS / f"{parts_dir.name}.json").write_text(json.dumps(fields))


def _refuse_or_log(report: DataReport, on_bad_row: str) -> None:
    if report.problems and on_bad_row == "error":
        raise DataError("\n".join([
            f"{len(report.problems)} bad row(s) in {report.source} "
            "(fix them, or set data.on_bad_row=skip to drop them):",
            *report.problem_lines(),
        ]))
    if report.problems:
        log.warning("data: skipping bad rows: %s", report.summary())
        for line in report.problem_lines():
            log.warning("data: skipped %s", line)
    else:
        log.info("data: %s", report.summary())
    if report.rows_kept == 0:
        raise DataError(f"{report.source}: no usable rows ({report.summary()})")


def prepare(cfg: RunConfig, tokenizer, out_dir: str | Path, progress: OnPart | None = None) -> TokenizedData:
    """Validate and tokenize `cfg.data` with `tokenizer`; write it under out_dir once; open it.

    Raises DataError when a row is bad and `data.on_bad_row` is error, when the source cannot
    be read or its columns do not fit the format, or when no row is left.
    """
    out_dir = Path(out_dir)
    plan = plan_source(cfg.data, cfg.data.part_rows)
    parts_dir = parts_dir_for(cfg, plan, tokenizer, out_dir)
    if (done := _prepared_before(parts_dir)) is not None:
        td, report = done
        _refuse_or_log(report, cfg.data.on_bad_row)
        log.info("data: reusing %s (prepared before from the same file and settings)", td.path)
        td.report = report
        return td
    existed = out_dir.exists()
    try:
        prepared = prepare_parts(cfg, tokenizer, out_dir, progress, plan)
        report = prepared.report
        _refuse_or_log(report, cfg.data.on_bad_row)
    except DataError:
        # The file must change before a run can start, and a changed file is a new key: these
        # parts would never be read again. (A killed or failed preparation keeps them.)
        if parts_dir is not None:
            shutil.rmtree(parts_dir, ignore_errors=True)
        if not existed and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise

    fp = prepared.fingerprint(cfg, tokenizer)
    manifest = {
        "fingerprint": fp, "format": prepared.spec.name, "num_rows": report.rows_kept,
        "max_length": cfg.data.max_length, "max_prompt_length": cfg.data.max_prompt_length,
        "pad_token_id": pad_token_id(tokenizer), "eos_token_id": tokenizer.eos_token_id,
        "report": report.to_dict(),
    }
    path = write_batches(out_dir, prepared.tables, manifest)
    if parts_dir is not None:
        # The parts are in the tokenized data now: a record of what they made replaces them.
        _record(parts_dir, path, report)
        shutil.rmtree(parts_dir, ignore_errors=True)
    td = TokenizedData.open(path)
    td.report = report  # this run's report, problems included (the manifest keeps the first's)
    return td


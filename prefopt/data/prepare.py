"""The pipeline in one place: read -> format -> validate -> tokenize -> fingerprint -> write once.

    td = prepare(cfg, tokenizer, out_dir)     # controller, once per run
    td = TokenizedData.open(td.path)          # any worker, from the path alone
    rows = td.rows([4, 9, 12])                # its own shard, by position

`data.on_bad_row`: error (default) stops with every problem listed (file, row, field); skip
drops the rows, logs a summary by reason and the first problems, and goes on. Problems of the
whole source (unreadable file, missing or extra columns) always stop. Nothing is written
before every row has passed, and the tokenized data is written once per fingerprint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from prefopt.config import RunConfig
from prefopt.data.errors import DataError
from prefopt.data.fingerprint import fingerprint, tokenizer_fingerprint
from prefopt.data.formats import FormatSpec, resolve_format
from prefopt.data.report import DataReport
from prefopt.data.sources import read_source
from prefopt.data.store import TokenizedData, to_table, write
from prefopt.data.tokenize import encode, pad_token_id
from prefopt.data.validate import check_rows

log = logging.getLogger("prefopt.data")


@dataclass
class Checked:
    """The in-memory result of reading, validating and tokenizing (nothing written yet)."""

    spec: FormatSpec
    table: pa.Table
    report: DataReport


def check(cfg: RunConfig, tokenizer) -> Checked:
    """Run every check and tokenize, whatever `on_bad_row` says; raise only for whole-source problems."""
    data = cfg.data
    source = read_source(data)
    spec = resolve_format(source, data.format, data.ignore_columns)
    examples, problems = check_rows(source, spec, data.assistant_marker)
    encoded = encode(examples, spec, source, tokenizer,
                     max_length=data.max_length, max_prompt_length=data.max_prompt_length)
    problems = sorted(problems + encoded.problems, key=lambda p: p.row or 0)
    table = to_table(encoded.columns)
    report = DataReport.build(source.name, spec.name, len(source.rows) + len(source.problems),
                              table.num_rows, problems, encoded.truncated)
    return Checked(spec, table, report)


def prepare(cfg: RunConfig, tokenizer, out_dir: str | Path) -> TokenizedData:
    """Validate and tokenize `cfg.data` with `tokenizer`; write it under out_dir once; open it.

    Raises DataError when a row is bad and `data.on_bad_row` is error, when the source cannot
    be read or its columns do not fit the format, or when no row is left.
    """
    checked = check(cfg, tokenizer)
    report = checked.report
    if report.problems and cfg.data.on_bad_row == "error":
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

    pad = pad_token_id(tokenizer)
    fp = fingerprint(checked.table, format=checked.spec.name,
                     tokenizer_id=tokenizer_fingerprint(tokenizer),
                     max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length)
    manifest = {
        "fingerprint": fp, "format": checked.spec.name, "num_rows": checked.table.num_rows,
        "max_length": cfg.data.max_length, "max_prompt_length": cfg.data.max_prompt_length,
        "pad_token_id": pad, "eos_token_id": tokenizer.eos_token_id,
        "report": report.to_dict(),
    }
    path = write(Path(out_dir), checked.table, manifest)
    td = TokenizedData.open(path)
    td.report = report  # this run's report, problems included (the manifest keeps the first's)
    return td

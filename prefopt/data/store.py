"""Tokenized data on disk: written once, opened by any process from its path, read by row.

Layout of a `TokenizedData` directory (named `tokenized-<fingerprint[:16]>`):
    examples.arrow   Arrow IPC file, one row per example (columns below), memory-mapped on read
    manifest.json    fingerprint, format, row count, lengths, token ids, report; written last

Columns by format kind:
    pair       row, prompt_ids, chosen_ids, rejected_ids
    unpaired   row, prompt_ids, completion_ids, label
    prompt     row, prompt_ids, prompt
`row` is the 1-based source row; ids are int32 lists, each completion ending in one EOS unless
truncated (prefopt.data.tokenize). An Arrow IPC file is memory-mapped, so a Ray worker that
opens it reads only the pages of the rows it takes, and all workers on a host share them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from prefopt.data.formats import format_kind
from prefopt.data.report import DataReport
from prefopt.storage import building_dir

MANIFEST = "manifest.json"
EXAMPLES = "examples.arrow"


def _schema(columns: dict[str, list]) -> pa.Schema:
    types = {"row": pa.int64(), "label": pa.bool_(), "prompt": pa.string()}
    return pa.schema([(name, types.get(name, pa.list_(pa.int32()))) for name in columns])


def to_table(columns: dict[str, list]) -> pa.Table:
    return pa.table(columns, schema=_schema(columns))


@dataclass
class TokenizedData:
    """Tokenized examples plus what produced them. Pickles as its path (cheap to ship to Ray)."""

    path: Path
    fingerprint: str
    format: str
    num_rows: int
    report: DataReport
    max_length: int
    max_prompt_length: int
    pad_token_id: int
    eos_token_id: int
    _table: pa.Table | None = field(default=None, repr=False)
    source: str | None = field(default=None, repr=False)  # the store's URI it was opened from, if not local

    def __len__(self) -> int:
        return self.num_rows

    @property
    def kind(self) -> str:
        """pair, unpaired or prompt (prefopt.data.formats.format_kind)."""
        return format_kind(self.format)

    @property
    def table(self) -> pa.Table:
        if self._table is None:
            with pa.memory_map(str(self.path / EXAMPLES)) as source:
                self._table = pa.ipc.open_file(source).read_all()
        return self._table

    def rows(self, indices: Sequence[int]) -> list[dict]:
        """Rows by position (0-based), each with its position as "index" (the RefCache key).

        Unpaired rows also carry "kl_completion_ids": the completion of row (index + 1) mod N.
        """
        # Row by row: take() on a table of several record batches (one per prepared part) joins
        # each column first, touching the whole corpus; a slice reads only the row's own pages.
        taken = [self.table.slice(int(i), 1).to_pylist()[0] for i in indices]
        for index, row in zip(indices, taken, strict=True):
            row["index"] = int(index)
        if self.kind == "unpaired":
            # KTO's mismatched partner: the next row's completion, fixed per example (cacheable).
            column = self.table["completion_ids"]
            for index, row in zip(indices, taken, strict=True):
                row["kl_completion_ids"] = column.slice((int(index) + 1) % self.num_rows, 1).to_pylist()[0]
        return taken

    @classmethod
    def open(cls, path: str | os.PathLike) -> TokenizedData:
        """From a local path, or a store's URI (downloaded once per node: see prefopt.storage)."""
        from prefopt.storage import is_remote, localize

        source = str(path) if is_remote(path) else None
        path = localize(path)
        manifest_file = path / MANIFEST
        if not manifest_file.is_file():
            raise FileNotFoundError(f"{path}: not tokenized data (no {MANIFEST}); run prefopt.data.prepare")
        m = json.loads(manifest_file.read_text())
        return cls(path, m["fingerprint"], m["format"], m["num_rows"], DataReport.from_dict(m["report"]),
                   m["max_length"], m["max_prompt_length"], m["pad_token_id"], m["eos_token_id"], source=source)

    def __reduce__(self):
        return (TokenizedData.open, (self.source or str(self.path),))


def write_batches(out_dir: Path, tables: Callable[[], Iterable[pa.Table]], manifest: dict) -> Path:
    """Write the tables that `tables()` yields, in order, as one examples file plus the manifest
    to out_dir/tokenized-<fp>, atomically; reuse it if it exists. One table is in memory at a time."""
    final = out_dir / f"tokenized-{manifest['fingerprint'][:16]}"
    if (final / MANIFEST).is_file():
        return final
    # Written beside the target, then renamed (prefopt.storage.building_dir): readers never see a
    # half-written directory, and a process that loses a race to write the same fingerprint
    # just discards its copy.
    with building_dir(final, complete=lambda done: (done / MANIFEST).is_file()) as tmp:
        with pa.OSFile(str(tmp / EXAMPLES), "wb") as sink:
            writer = None
            for table in tables():
                writer = writer or pa.ipc.new_file(sink, table.schema)
                writer.write_table(table)
            writer.close()
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return final

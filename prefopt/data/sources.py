"""Read rows from where the data lives: a file, a Hugging Face dataset, or a built-in task.

Every source becomes a `Source`: a name that error messages can quote, the column names, and
rows as (row number, dict) with 1-based row numbers counted the way a user would find the row
again: the line of a JSONL file, the data row of a CSV (header not counted), the row of a
Parquet file or dataset split. Values are kept exactly as read; judging them is validate.py's
job, so that a bad value becomes a message naming its row and field rather than a parse error.
Text must be UTF-8: a line or value that is not is a bad row (not_utf8), never a crash.

`data.path` may be
- `*.jsonl` / `*.json` (JSON Lines, or one JSON array of objects), `*.parquet`, `*.csv`, `*.tsv`;
- a directory written by `datasets.Dataset.save_to_disk` (a DatasetDict: `data.split` picks);
- any other directory or a glob: read with `datasets.load_dataset(path, split=data.split)`.
With `data.path` null, `data.task` names a built-in task (prefopt.tasks).
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass, field
from pathlib import Path

from prefopt.config import DataConfig
from prefopt.data.errors import DataError, Problem


@dataclass
class Source:
    name: str  # what messages call it: a file path, "dataset DIR (split train)", "task NAME"
    columns: list[str]  # in first-seen order
    rows: list[tuple[int, dict]]  # (1-based row number, {column: value})
    problems: list[Problem] = field(default_factory=list)  # rows that could not be parsed
    row_word: str = "row"  # JSONL rows are lines; messages say "line 7"


def read_source(cfg: DataConfig) -> Source:
    """Read the rows of `cfg.path` (or `cfg.task`), at most `cfg.num_examples` of them."""
    if cfg.path is None:
        source = _read_task(cfg)
    else:
        source = _read_path(cfg)
    if cfg.num_examples is not None:
        # The first N rows of the source, good or bad: a line that could not be parsed counts,
        # and one further down is not reported.
        numbers = sorted([n for n, _ in source.rows] + [p.row for p in source.problems])
        if len(numbers) > cfg.num_examples:
            last = numbers[cfg.num_examples - 1]
            source.rows = [(n, row) for n, row in source.rows if n <= last]
            source.problems = [p for p in source.problems if p.row <= last]
    return source


def _read_path(cfg: DataConfig) -> Source:
    path = Path(cfg.path).expanduser()
    if any(ch in cfg.path for ch in "*?["):
        return _read_with_datasets(cfg.path, cfg.split)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _read_saved_dataset(path, cfg.split)
        return _read_with_datasets(str(path), cfg.split)
    if not path.is_file():
        raise DataError(f"data.path: {path}: no such file or directory")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_json(path)
    if suffix in (".parquet", ".pq"):
        return _read_parquet(path)
    if suffix in (".csv", ".tsv"):
        return _read_csv(path, delimiter="\t" if suffix == ".tsv" else ",")
    raise DataError(
        f"data.path: {path}: unknown file type {suffix!r} "
        "(use .jsonl, .json, .parquet, .csv, .tsv, or a dataset directory)"
    )


def _columns_of(rows: list[tuple[int, dict]]) -> list[str]:
    seen: dict[str, None] = {}
    for _, row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def _not_utf8_message(exc: UnicodeDecodeError, position: str) -> str:
    """What a UnicodeDecodeError means to a user: which bytes, where ("column 12"), and a fix."""
    raw, start = exc.object, exc.start
    bad = " ".join(f"0x{b:02x}" for b in raw[start : exc.end])
    before = raw[:start].decode("utf-8")  # valid: decoding stopped at the first bad byte
    after = raw[start:].decode("utf-8", errors="replace")
    near = before[-20:] + after[:20]
    return (f"not UTF-8: {'byte' if exc.end - start == 1 else 'bytes'} {bad} at {position} "
            f"{len(before) + 1}, near {near!r}; save the data as UTF-8 (it may be in another "
            "encoding, such as Windows-1252), or fix that character")


def refuse_utf16(path: Path) -> None:
    # Windows tools (PowerShell's `>`) write UTF-16; every line would be a bad row otherwise.
    with path.open("rb") as f:
        head = f.read(2)
    if head in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        raise DataError(f"{path}: the file is UTF-16 (it starts with a UTF-16 byte order mark); "
                        "save it as UTF-8")


def _read_json(path: Path) -> Source:
    refuse_utf16(path)
    # A UTF-8 byte order mark (some Windows editors write one) would make line 1 invalid JSON.
    return parse_json(str(path), path.read_bytes().removeprefix(codecs.BOM_UTF8))


def parse_json(name: str, data: bytes, first_line: int = 1) -> Source:
    """The rows of JSON Lines (or one JSON array) in `data`, whose first line is `first_line` of
    the file `name`: a part of a large file is parsed alone (prefopt.data.parts)."""
    lines: list[tuple[int, str]] = []
    problems = []
    # Split the bytes at \n, \r\n or \r only: str.splitlines would also split at U+2028 and
    # other characters that a JSON string may hold, and miscount the lines after them.
    for number, raw in enumerate(data.splitlines(), start=first_line):
        try:
            lines.append((number, raw.decode("utf-8")))
        except UnicodeDecodeError as exc:
            problems.append(Problem(name, number, None, "not_utf8",
                                    _not_utf8_message(exc, "column"), row_word="line"))
    rows: list[tuple[int, dict]] = []
    if data.lstrip().startswith(b"["):
        # One JSON array of objects: an error here has no row to blame, so it is fatal.
        if problems:
            raise DataError(str(problems[0]))
        try:
            items = json.loads("\n".join(line for _, line in lines))
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}: not valid JSON: {exc}") from None
        numbered = list(enumerate(items, start=1))
        word = "row"
    else:
        numbered = []
        for number, line in lines:
            if not line.strip():
                continue
            try:
                numbered.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                problems.append(Problem(name, number, None, "bad_json",
                                        f"not valid JSON: {exc}", row_word="line"))
        word = "line"
    for number, item in numbered:
        if isinstance(item, dict):
            rows.append((number, item))
        else:
            problems.append(Problem(name, number, None, "bad_json",
                                    f"expected a JSON object, got {type(item).__name__}",
                                    row_word=word))
    return Source(name, _columns_of(rows), rows, problems, row_word=word)


def from_table(name: str, table, first_row: int = 1) -> Source:
    """The rows of an Arrow table, the first numbered `first_row`; a string that is not UTF-8
    makes its row a bad row.

    Arrow does not always check: pyarrow writes such strings to Parquet, datasets' JSON loader
    keeps them, and the CSV reader here is told not to check, so that the row can be named.
    """
    try:
        rows = list(enumerate(table.to_pylist(), start=first_row))
        return Source(name, list(table.column_names), rows)
    except UnicodeDecodeError:
        pass  # slow path, only for data holding such a string: find its rows, cell by cell
    values, problems = {}, {}
    for column in table.column_names:
        try:
            values[column] = table.column(column).to_pylist()
            continue
        except UnicodeDecodeError:
            pass
        values[column] = []
        for i, cell in enumerate(table.column(column)):
            try:
                values[column].append(cell.as_py())
            except UnicodeDecodeError as exc:
                values[column].append(None)
                problems.setdefault(i + first_row, Problem(name, i + first_row, column, "not_utf8",
                                                           _not_utf8_message(exc, "character")))
    rows = [(i + first_row, {c: values[c][i] for c in table.column_names})
            for i in range(table.num_rows) if i + first_row not in problems]
    return Source(name, list(table.column_names), rows, sorted(problems.values(), key=lambda p: p.row))


def _from_dataset(name: str, dataset) -> Source:
    # The Arrow view honours a dataset's indices mapping (select/shuffle), unlike its raw table.
    return from_table(name, dataset.with_format("arrow")[:])


def _read_parquet(path: Path) -> Source:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types; all mean "not a Parquet file"
        raise DataError(f"{path}: cannot read as Parquet: {exc}") from None
    return from_table(str(path), table)


def _read_csv(path: Path, delimiter: str) -> Source:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    refuse_utf16(path)
    parse = pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True)
    try:
        names = pacsv.open_csv(path, parse_options=parse).schema.names
    except UnicodeDecodeError as exc:
        message = _not_utf8_message(exc, "character")
        raise DataError(f"{path}: a column name in the header is {message}") from None
    except pa.ArrowInvalid as exc:
        raise DataError(f"{path}: cannot read as CSV: {exc}") from None
    # Every column as text: a CSV has no types, and "5" is a string the user wrote. UTF-8 is
    # checked per value (from_table), so that a bad byte names its row rather than the file.
    convert = pacsv.ConvertOptions(
        column_types={n: pa.string() for n in names}, strings_can_be_null=False, check_utf8=False
    )
    try:
        table = pacsv.read_csv(path, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as exc:
        raise DataError(f"{path}: cannot read as CSV: {exc}") from None
    return from_table(str(path), table)


def _pick_split(dataset, name: str, split: str):
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError(
                f"{name}: no split {split!r} (data.split); splits: {', '.join(dataset)}"
            )
        return dataset[split]
    return dataset


def _read_saved_dataset(path: Path, split: str) -> Source:
    import datasets

    dataset = _pick_split(datasets.load_from_disk(str(path)), str(path), split)
    return _from_dataset(f"dataset {path} (split {split})", dataset)


def _read_with_datasets(path: str, split: str) -> Source:
    import datasets

    try:
        dataset = datasets.load_dataset(path, split=split)
    except (ValueError, datasets.exceptions.DatasetsError) as exc:
        # e.g. an unknown split, no data files, or a file its builder cannot parse (a CSV with
        # a byte that is not UTF-8): the cause is what a user can act on.
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""
        raise DataError(f"data.path: {path}: datasets.load_dataset failed: {exc}{cause}") from None
    return _from_dataset(f"dataset {path} (split {split})", dataset)


def _read_task(cfg: DataConfig) -> Source:
    from prefopt.tasks import get_task

    try:
        task = get_task(cfg.task)
    except KeyError as exc:
        raise DataError(exc.args[0]) from None
    fmt = task.formats[0] if cfg.format == "auto" else cfg.format
    if fmt not in task.formats:
        raise DataError(
            f"data.format: task {task.name} provides {', '.join(task.formats)}, not {fmt!r}"
        )
    try:
        items = task.build(cfg, fmt)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    rows = list(enumerate(items, start=1))
    return Source(f"task {task.name} (split {cfg.split})", _columns_of(rows), rows)

"""Read rows from where the data lives: a file, a Hugging Face dataset, or a built-in task.

Every source becomes a `Source`: a name that error messages can quote, the column names, and
rows as (row number, dict) with 1-based row numbers counted the way a user would find the row
again: the line of a JSONL file, the data row of a CSV (header not counted), the row of a
Parquet file or dataset split. Values are kept exactly as read; judging them is validate.py's
job, so that a bad value becomes a message naming its row and field rather than a parse error.

`data.path` may be
- `*.jsonl` / `*.json` (JSON Lines, or one JSON array of objects), `*.parquet`, `*.csv`, `*.tsv`;
- a directory written by `datasets.Dataset.save_to_disk` (a DatasetDict: `data.split` picks);
- any other directory or a glob: read with `datasets.load_dataset(path, split=data.split)`.
With `data.path` null, `data.task` names a built-in task (prefopt.tasks).
"""

from __future__ import annotations

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
        source.rows = source.rows[: cfg.num_examples]
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


def _read_json(path: Path) -> Source:
    text = path.read_text(encoding="utf-8")
    rows: list[tuple[int, dict]] = []
    problems = []
    if text.lstrip().startswith("["):
        # One JSON array of objects: a syntax error here has no row to blame, so it is fatal.
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON: {exc}") from None
        numbered = list(enumerate(items, start=1))
        word = "row"
    else:
        numbered = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                problems.append(Problem(str(path), number, None, "bad_json",
                                        f"not valid JSON: {exc}", row_word="line"))
        word = "line"
    for number, item in numbered:
        if isinstance(item, dict):
            rows.append((number, item))
        else:
            problems.append(Problem(str(path), number, None, "bad_json",
                                    f"expected a JSON object, got {type(item).__name__}",
                                    row_word=word))
    return Source(str(path), _columns_of(rows), rows, problems, row_word=word)


def _from_table(name: str, table) -> Source:
    rows = list(enumerate(table.to_pylist(), start=1))
    return Source(name, list(table.column_names), rows)


def _from_dataset(name: str, dataset) -> Source:
    # to_list() honours a dataset's indices mapping (select/shuffle), unlike its raw table.
    return Source(name, list(dataset.column_names), list(enumerate(dataset.to_list(), start=1)))


def _read_parquet(path: Path) -> Source:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types; all mean "not a Parquet file"
        raise DataError(f"{path}: cannot read as Parquet: {exc}") from None
    return _from_table(str(path), table)


def _read_csv(path: Path, delimiter: str) -> Source:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    parse = pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True)
    try:
        # Every column as text: a CSV has no types, and "5" is a string the user wrote.
        names = pacsv.open_csv(path, parse_options=parse).schema.names
        convert = pacsv.ConvertOptions(
            column_types={n: pa.string() for n in names}, strings_can_be_null=False
        )
        table = pacsv.read_csv(path, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as exc:
        raise DataError(f"{path}: cannot read as CSV: {exc}") from None
    return _from_table(str(path), table)


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
    except ValueError as exc:  # e.g. an unknown split, or no data files found
        raise DataError(f"data.path: {path}: datasets.load_dataset failed: {exc}") from None
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

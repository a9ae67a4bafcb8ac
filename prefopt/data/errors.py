"""What can be wrong with data: `DataError` stops a run, a `Problem` is one bad row.

A leaf of prefopt.data: sources, formats, validate and tokenize all report problems, so these
live apart from any of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefopt.errors import UserError


class DataError(UserError, ValueError):
    """Data that cannot be used; the message names the source, row (1-based) and field."""


@dataclass(frozen=True)
class Problem:
    source: str
    row: int | None  # 1-based; None for a problem of the whole source
    field: str | None  # e.g. "chosen", "prompt[2].role"
    reason: str  # a key of prefopt.data.validate.REASONS
    message: str
    row_word: str = "row"

    def __str__(self) -> str:
        where = self.source
        if self.row is not None:
            where += f": {self.row_word} {self.row} (1-based)"
        if self.field is not None:
            where += f", field '{self.field}'"
        return f"{where}: {self.message}"

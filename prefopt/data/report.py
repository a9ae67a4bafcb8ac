"""What happened to the rows of a data set: read, kept, dropped by reason, truncated by field."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from prefopt.data.errors import Problem
from prefopt.data.validate import REASONS

SHOWN_PROBLEMS = 20  # problems quoted in an error or a log; the rest are counted


@dataclass
class DataReport:
    source: str
    format: str
    rows_read: int
    rows_kept: int
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows (first reason of a row)
    truncated: dict[str, int] = field(default_factory=dict)  # completion field -> rows cut
    problems: list[Problem] = field(default_factory=list)  # every problem (not saved to disk)

    @classmethod
    def build(cls, source: str, format: str, rows_read: int, rows_kept: int,
              problems: list[Problem], truncated: Counter) -> DataReport:
        first_reason: dict[int | None, str] = {}
        for p in problems:
            first_reason.setdefault(p.row, p.reason)
        dropped = Counter(first_reason.values())
        return cls(source, format, rows_read, rows_kept, dict(sorted(dropped.items())),
                   dict(sorted(truncated.items())), problems)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["problems"] = [str(p) for p in self.problems[:SHOWN_PROBLEMS]]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> DataReport:
        # Problems come back as their messages only; counts are what later readers need.
        return cls(**{**d, "problems": []})

    def summary(self) -> str:
        """One line for the run's log, e.g. 'kept 1990 of 2000 rows; dropped 10 (identical 10)'."""
        line = f"{self.source}: format {self.format}; kept {self.rows_kept} of {self.rows_read} rows"
        if self.dropped:
            by = ", ".join(f"{r} {n}" for r, n in self.dropped.items())
            line += f"; dropped {sum(self.dropped.values())} ({by})"
        if self.truncated:
            by = ", ".join(f"{f} {n}" for f, n in self.truncated.items())
            line += f"; completions truncated to data.max_length: {by}"
        return line

    def problem_lines(self, limit: int = SHOWN_PROBLEMS) -> list[str]:
        lines = [str(p) for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"... and {len(self.problems) - limit} more problems")
        return lines


def describe_reason(reason: str) -> str:
    return REASONS.get(reason, reason)

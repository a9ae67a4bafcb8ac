"""Which of the five data formats a source holds: from its columns, or as `data.format` says.

| format            | columns                    | values                                    |
|-------------------|----------------------------|-------------------------------------------|
| `preference`      | prompt, chosen, rejected   | strings                                   |
| `conversational`  | prompt, chosen, rejected   | lists of {role, content} messages         |
| `implicit_prompt` | chosen, rejected           | full transcripts (strings or messages)    |
| `unpaired`        | prompt, completion, label  | strings or messages; label true/false     |
| `prompt_only`     | prompt                     | string or messages                        |

Any other column is an error unless listed in `data.ignore_columns`: a column the format does not
read is most often a misnamed one (a "question" column next to chosen/rejected would otherwise
be read as implicit_prompt and silently dropped).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from prefopt.data.errors import DataError
from prefopt.data.sources import Source

COLUMNS: dict[str, tuple[str, ...]] = {
    "preference": ("prompt", "chosen", "rejected"),
    "conversational": ("prompt", "chosen", "rejected"),
    "implicit_prompt": ("chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "prompt_only": ("prompt",),
}
# The sequences of one example by kind, in batch order (prefopt.data.collate); also the columns of
# the reference cache. An unpaired example's second sequence is KTO's KL pair: its prompt with the
# completion of the next row (TokenizedData.rows).
SEQUENCE_ROLES: dict[str, tuple[str, str]] = {"pair": ("chosen", "rejected"), "unpaired": ("completion", "kl")}
# Auto-detection tries the formats with more columns first, so the most specific one wins.
_DETECT_ORDER = ("unpaired", "preference", "implicit_prompt", "prompt_only")


def format_kind(name: str) -> str:
    """pair (chosen + rejected), unpaired (completion + label) or prompt (no completion)."""
    return {"unpaired": "unpaired", "prompt_only": "prompt"}.get(name, "pair")


@dataclass(frozen=True)
class FormatSpec:
    name: str  # a key of COLUMNS
    messages: bool  # values are message lists, rendered with the tokenizer's chat template

    @property
    def columns(self) -> tuple[str, ...]:
        return COLUMNS[self.name]

    @property
    def kind(self) -> str:
        return format_kind(self.name)

    @property
    def completions(self) -> tuple[str, ...]:
        """The completion columns: the sequences of an example that the data holds itself."""
        return tuple(c for c in self.columns if c in SEQUENCE_ROLES.get(self.kind, ()))


def _first_value(source: Source, column: str):
    return next((row[column] for _, row in source.rows if row.get(column) is not None), None)


def resolve_format(source: Source, requested: str, ignore_columns: list[str]) -> FormatSpec:
    """The source's format; raises DataError for missing, extra or undetectable columns."""
    present = [c for c in source.columns if c not in ignore_columns]
    if requested == "auto":
        name = next((f for f in _DETECT_ORDER if set(COLUMNS[f]) <= set(present)), None)
        if name is None:
            wanted = "; ".join(f"{f}: {', '.join(COLUMNS[f])}" for f in _DETECT_ORDER)
            raise DataError(
                f"{source.name}: cannot tell the data format from its columns "
                f"({', '.join(present) or 'none'}); expected one of  {wanted}"
                + _did_you_mean(present, {c for cols in COLUMNS.values() for c in cols})
            )
    else:
        name = requested
        missing = [c for c in COLUMNS[name] if c not in present]
        if missing:
            raise DataError(
                f"{source.name}: format {name} needs column(s) {', '.join(missing)}; "
                f"the data has {', '.join(present) or 'none'}"
                + _did_you_mean([c for c in present if c not in COLUMNS[name]], missing)
            )
    extra = [c for c in present if c not in COLUMNS[name]]
    if extra:
        raise DataError(
            f"{source.name}: extra column(s) {', '.join(extra)} not read by format {name} "
            f"(columns {', '.join(COLUMNS[name])}); rename them, or list them in "
            "data.ignore_columns to drop them"
        )
    if name == "conversational":
        return FormatSpec(name, messages=True)
    if name == "preference":
        # Message lists in prompt/chosen/rejected are the conversational format.
        messages = requested == "auto" and isinstance(_first_value(source, "chosen"), list)
        return FormatSpec("conversational" if messages else name, messages=messages)
    probe = "chosen" if name == "implicit_prompt" else "prompt"
    return FormatSpec(name, messages=isinstance(_first_value(source, probe), list))


def _did_you_mean(names: list[str], targets) -> str:
    hints = []
    for name in names:
        close = difflib.get_close_matches(name, list(targets), n=1, cutoff=0.6)
        if close and close[0] != name:
            hints.append(f"'{name}' -> '{close[0]}'")
    return f" (did you mean {', '.join(hints)}?)" if hints else ""

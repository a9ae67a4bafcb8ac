"""Check every row before any compute; turn each good row into an `Example`.

A problem names the source, the row (1-based, and says so) and the field, e.g.

    data/hh.jsonl: line 7 (1-based), field 'chosen': same transcript as 'rejected'

All rows are checked, so a user sees every problem at once rather than one per run. Whether a
problem stops the run or drops its row is `data.on_bad_row`'s call (prefopt.data.prepare).
`REASONS` lists every reason a row can be refused; tokenize.py adds the ones that need tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from prefopt.data.errors import Problem
from prefopt.data.formats import FormatSpec
from prefopt.data.sources import Source

ROLES = ("system", "user", "assistant")

REASONS = {
    "bad_json": "a line that is not a JSON object",
    "not_utf8": "a line or value that is not UTF-8 text (another encoding, or half a surrogate pair)",
    "missing_value": "a null or absent value",
    "not_string": "a value that should be a string is not",
    "not_messages": "a value that should be a list of {role, content} messages is not",
    "empty": "an empty (or whitespace-only) prompt, completion or message",
    "unknown_role": f"a message role other than {', '.join(ROLES)}",
    "prompt_ends_with_assistant": "a prompt conversation whose last message is the assistant's",
    "not_assistant_last": "a conversation that does not end with an assistant message",
    "completion_turns": "a completion that is not exactly one assistant turn",
    "identical": "chosen identical to rejected",
    "bad_label": "an unpaired label that is not true/false",
    "no_shared_prompt": "implicit prompt: chosen and rejected share no prompt",
    "template_error": "the chat template failed or did not render the prompt as a prefix",
    "eos_in_text": "a completion containing the EOS token before its end",
    "no_room": "a prompt longer than data.max_prompt_length, leaving no room for the completion",
    "identical_after_truncation": "chosen and rejected identical once tokenized and truncated",
}


@dataclass
class Example:
    """A row that passed validation. Text or message lists, as in the source."""

    row: int  # 1-based row number in the source
    prompt: str | list[dict]
    completions: tuple  # (chosen, rejected), (completion,) or ()
    label: bool | None = None  # unpaired: desirable?


class BadRow(Exception):
    """Raised inside a row's checks (here and in tokenize.py) at the first problem of the row."""

    def __init__(self, field: str | None, reason: str, message: str):
        super().__init__(message)
        self.field, self.reason, self.message = field, reason, message


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _check_text(value, field: str) -> str:
    if value is None:
        raise BadRow(field, "missing_value", "no value")
    if not isinstance(value, str):
        raise BadRow(field, "not_string", f"expected a string, got {_describe(value)}")
    if not value.strip():
        raise BadRow(field, "empty", "empty text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        # JSON may escape a lone surrogate ("\ud83d", half an emoji cut in two): json.loads
        # accepts it, the tokenizer does not.
        raise BadRow(
            field, "not_utf8",
            f"holds {value[exc.start]!r} at character {exc.start + 1}: half of a UTF-16 surrogate "
            "pair, which is not text (a character cut in two); remove it or write the whole character",
        ) from None
    return value


def _check_messages(value, field: str) -> list[dict]:
    if value is None:
        raise BadRow(field, "missing_value", "no value")
    if not isinstance(value, list):
        raise BadRow(
            field, "not_messages",
            f"expected a list of {{role, content}} messages, got {_describe(value)}",
        )
    if not value:
        raise BadRow(field, "empty", "no messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise BadRow(
                f"{field}[{i}]", "not_messages",
                f"expected a {{role, content}} message, got {_describe(message)}",
            )
        role = message["role"]
        if role not in ROLES:
            raise BadRow(
                f"{field}[{i}].role", "unknown_role",
                f"unknown role {role!r} (allowed: {', '.join(ROLES)})",
            )
        _check_text(message["content"], f"{field}[{i}].content")
    # Keep only role and content: extra keys (e.g. null tool_calls from Parquet structs) would
    # reach the chat template, and two equal conversations could compare unequal.
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _check_prompt_turns(messages: list[dict], field: str) -> None:
    # Names the message, not its role: the fix is to remove it (or move it), not to relabel it.
    if messages[-1]["role"] == "assistant":
        raise BadRow(
            f"{field}[{len(messages) - 1}]", "prompt_ends_with_assistant",
            "the prompt ends with an assistant message; the completion must be the next turn",
        )


def _check_ends_with_assistant(messages: list[dict], field: str) -> None:
    # A whole transcript (implicit prompt): most often its reply is missing, so this names the
    # transcript rather than the role of its last message.
    if messages[-1]["role"] != "assistant":
        raise BadRow(
            field, "not_assistant_last",
            f"the conversation ends with a {messages[-1]['role']!r} message, not the assistant's",
        )


def _check_completion_turns(messages: list[dict], field: str) -> None:
    if len(messages) != 1:
        roles = ", ".join(m["role"] for m in messages)
        raise BadRow(
            field, "completion_turns",
            f"a completion is one assistant message; got {len(messages)} ({roles})",
        )
    if messages[0]["role"] != "assistant":
        raise BadRow(
            f"{field}[0].role", "not_assistant_last",
            f"the completion is a {messages[0]['role']!r} message, not the assistant's",
        )


def _check_label(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if value is None:
        raise BadRow("label", "missing_value", "no value")
    raise BadRow("label", "bad_label", f"expected true or false, got {_describe(value)}")


def _split_text_transcripts(chosen: str, rejected: str, marker: str) -> tuple[str, str, str]:
    """Anthropic-HH style: the prompt is the shared prefix up to its last assistant marker."""
    for field, text in (("chosen", chosen), ("rejected", rejected)):
        if marker not in text:
            raise BadRow(
                field, "no_shared_prompt",
                f"no data.assistant_marker {marker!r} in it (the text before each assistant "
                "turn; set data.assistant_marker to the one this data uses)",
            )
    shared = os.path.commonprefix([chosen, rejected])
    end = shared.rfind(marker)
    if end < 0:
        raise BadRow(
            "chosen", "no_shared_prompt",
            f"chosen and rejected share no prefix ending in data.assistant_marker {marker!r}",
        )
    end += len(marker)
    prompt, completions = chosen[:end], (chosen[end:], rejected[end:])
    for field, text in zip(("chosen", "rejected"), completions, strict=True):
        if not text.strip():
            raise BadRow(field, "empty", "nothing after the shared prompt")
        if marker in text:
            raise BadRow(
                field, "completion_turns",
                "chosen and rejected differ before their last assistant turn, so the "
                "completion would hold several turns",
            )
    return prompt, *completions


def _split_message_transcripts(chosen: list[dict], rejected: list[dict]):
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise BadRow("chosen", "no_shared_prompt",
                     "chosen and rejected do not start with the same message")
    rests = {"chosen": chosen[shared:], "rejected": rejected[shared:]}
    # First the transcript that goes on past the point where the two differ: the fix is there
    # (the shared prompt would otherwise end with an assistant message, and be blamed instead).
    for field, messages in rests.items():
        if len(messages) > 1:
            raise BadRow(
                f"{field}[{shared}]", "completion_turns",
                "chosen and rejected first differ here, before their last assistant turn, so "
                f"the completion would be {len(messages)} messages rather than one",
            )
    for field, messages in rests.items():
        if not messages:
            raise BadRow(field, "empty", "nothing after the shared prompt")
    prompt = chosen[:shared]
    _check_prompt_turns(prompt, "chosen")  # two assistant messages in a row
    return prompt, rests["chosen"], rests["rejected"]


def _check_row(row: dict, spec: FormatSpec, marker: str, number: int) -> Example:
    check = _check_messages if spec.messages else _check_text
    if spec.name == "implicit_prompt":
        chosen, rejected = check(row.get("chosen"), "chosen"), check(row.get("rejected"), "rejected")
        if chosen == rejected:
            raise BadRow("chosen", "identical", "same transcript as 'rejected'")
        if spec.messages:
            _check_ends_with_assistant(chosen, "chosen")
            _check_ends_with_assistant(rejected, "rejected")
            prompt, *completions = _split_message_transcripts(chosen, rejected)
        else:
            prompt, *completions = _split_text_transcripts(chosen, rejected, marker)
        return Example(number, prompt, tuple(completions))

    prompt = check(row.get("prompt"), "prompt")
    if spec.messages:
        _check_prompt_turns(prompt, "prompt")
    completions = tuple(check(row.get(f), f) for f in spec.completions)
    if spec.messages:
        for field, messages in zip(spec.completions, completions, strict=True):
            _check_completion_turns(messages, field)
    if spec.kind == "pair" and completions[0] == completions[1]:
        raise BadRow("chosen", "identical", "same completion as 'rejected'")
    label = _check_label(row.get("label")) if spec.kind == "unpaired" else None
    return Example(number, prompt, completions, label)


def check_rows(source: Source, spec: FormatSpec, assistant_marker: str):
    """Validate all rows -> (examples, problems); a row with a problem yields no example."""
    examples, problems = [], list(source.problems)
    for number, row in source.rows:
        try:
            examples.append(_check_row(row, spec, assistant_marker, number))
        except BadRow as p:
            problems.append(Problem(source.name, number, p.field, p.reason, p.message, source.row_word))
    return examples, problems

"""Each kind of bad row and bad source gives the promised message: file, row (1-based), field."""

import copy
import json
import logging

import pytest

from prefopt.config import RunConfig
from prefopt.data import DataError, check, prepare
from prefopt.data.validate import REASONS

# Film words: the tiny tokenizer is trained on movie reviews, so token counts stay small.
GOOD = {"prompt": "The film was", "chosen": " great.", "rejected": " awful."}
USER = {"role": "user", "content": "How many legs does a spider have?"}
ANSWER = {"role": "assistant", "content": "Eight."}
GOOD_CHAT = {"prompt": [USER], "chosen": [ANSWER], "rejected": [{"role": "assistant", "content": "Six."}]}
GOOD_HH = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello there.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}
GOOD_KTO = {"prompt": "The film was", "completion": " great.", "label": True}
SIX = {"role": "assistant", "content": "Six."}
GOOD_CHAT_HH = {"chosen": [USER, ANSWER], "rejected": [USER, SIX]}
SURE = {"role": "user", "content": "Sure?"}


def cfg_for(path, **data):
    return RunConfig.model_validate({"data": {"path": str(path), **data}})


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


# (good first row, bad second row, extra data config, reason, field, message). The field is the
# one a user must edit; None when no field of the row is at fault.
CASES = [
    (GOOD, {**GOOD, "rejected": None}, {}, "missing_value", "rejected", "no value"),
    (GOOD, {"prompt": "The film was", "chosen": 7, "rejected": " awful."}, {}, "not_string", "chosen",
     "expected a string, got int 7"),
    (GOOD_CHAT, {**GOOD_CHAT, "chosen": "Eight."}, {}, "not_messages", "chosen",
     "expected a list of {role, content} messages, got str 'Eight.'"),
    (GOOD, {**GOOD, "prompt": "   "}, {}, "empty", "prompt", "empty text"),
    (GOOD_CHAT, {**GOOD_CHAT, "chosen": [{"role": "assistant", "content": ""}]}, {}, "empty",
     "chosen[0].content", "empty text"),
    (GOOD_CHAT, {**GOOD_CHAT, "chosen": [{"role": "bot", "content": "Eight."}]}, {}, "unknown_role",
     "chosen[0].role", "unknown role 'bot' (allowed: system, user, assistant)"),
    # The message to remove, not its role: relabelling it would hide the problem.
    (GOOD_CHAT, {**GOOD_CHAT, "prompt": [USER, ANSWER]}, {}, "prompt_ends_with_assistant",
     "prompt[1]", "the prompt ends with an assistant message; the completion must be the next turn"),
    (GOOD_CHAT_HH, {"chosen": [USER, ANSWER, ANSWER], "rejected": [USER, ANSWER, SIX]}, {},
     "prompt_ends_with_assistant", "chosen[1]",
     "the prompt ends with an assistant message; the completion must be the next turn"),
    # A one-message completion with the wrong role: the role is what to change.
    (GOOD_CHAT, {**GOOD_CHAT, "chosen": [{"role": "user", "content": "Eight?"}]}, {}, "not_assistant_last",
     "chosen[0].role", "the completion is a 'user' message, not the assistant's"),
    # A transcript without the assistant's reply: the transcript, not its last role.
    (GOOD_CHAT_HH, {"chosen": [USER, ANSWER], "rejected": [USER]}, {},
     "not_assistant_last", "rejected", "the conversation ends with a 'user' message, not the assistant's"),
    (GOOD_CHAT, {**GOOD_CHAT, "chosen": [ANSWER, ANSWER]}, {}, "completion_turns", "chosen",
     "a completion is one assistant message; got 2 (assistant, assistant)"),
    (GOOD_CHAT, {**GOOD_CHAT, "chosen": [ANSWER, SURE]}, {}, "completion_turns", "chosen",
     "a completion is one assistant message; got 2 (assistant, user)"),
    # Implicit prompt, messages: the message where the two transcripts part, not the shared prompt.
    (GOOD_CHAT_HH, {"chosen": [USER, ANSWER, SURE, ANSWER], "rejected": [USER, ANSWER, USER, SIX]}, {},
     "completion_turns", "chosen[2]",
     "chosen and rejected first differ here, before their last assistant turn, so the completion "
     "would be 2 messages rather than one"),
    (GOOD_CHAT_HH, {"chosen": [USER, ANSWER], "rejected": [USER, ANSWER, SURE, SIX]}, {},
     "completion_turns", "rejected[2]",
     "chosen and rejected first differ here, before their last assistant turn, so the completion "
     "would be 2 messages rather than one"),
    (GOOD, {**GOOD, "rejected": " great."}, {}, "identical", "chosen", "same completion as 'rejected'"),
    (GOOD_HH, {"chosen": GOOD_HH["chosen"], "rejected": GOOD_HH["chosen"]}, {}, "identical", "chosen",
     "same transcript as 'rejected'"),
    (GOOD_KTO, {**GOOD_KTO, "label": "maybe"}, {}, "bad_label", "label", "expected true or false, got str 'maybe'"),
    (GOOD_HH, {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hey\n\nAssistant: Hello."},
     {}, "no_shared_prompt", "chosen",
     "chosen and rejected share no prefix ending in data.assistant_marker '\\n\\nAssistant:'"),
    # The marker is missing from one transcript: that one (or data.assistant_marker) is the fix.
    (GOOD_HH, {"chosen": GOOD_HH["chosen"], "rejected": "\n\nHuman: Hi\n\nassistant: Go away."},
     {}, "no_shared_prompt", "rejected",
     "no data.assistant_marker '\\n\\nAssistant:' in it (the text before each assistant turn; "
     "set data.assistant_marker to the one this data uses)"),
    (GOOD_HH, {"chosen": "\n\nHuman: Hi\n\nAssistant: Yes.\n\nHuman: Sure?\n\nAssistant: Yes.",
               "rejected": "\n\nHuman: Hi\n\nAssistant: No.\n\nHuman: Sure?\n\nAssistant: No."},
     {}, "completion_turns", "chosen",
     "chosen and rejected differ before their last assistant turn, so the completion would hold several turns"),
    (GOOD, {**GOOD, "chosen": " great.<|eos|> And funny."}, {}, "eos_in_text", "chosen",
     "contains the EOS token '<|eos|>' before its end (the model would learn to stop there)"),
    (GOOD, {**GOOD, "prompt": " ".join(["The film was great."] * 8)}, {"max_prompt_length": 16, "max_length": 64},
     "no_room", "prompt", "the prompt has 41 tokens, more than data.max_prompt_length=16: it leaves no room for the "
     "completion within data.max_length=64 (prompts are never cut; raise both, or skip such rows)"),
    # Both completions are fine; data.max_length makes them equal, so no field is named.
    (GOOD, {"prompt": "The film was", "chosen": " great, and also funny.", "rejected": " great, and also boring."},
     {"max_prompt_length": 6, "max_length": 8}, "identical_after_truncation", None,
     "chosen and rejected have the same first 4 tokens, all that data.max_length=8 leaves after the "
     "4-token prompt; they differ from token 5: raise data.max_length to at least 9, or skip such rows"),
    (GOOD, {**GOOD, "chosen": " awful.<|eos|>"}, {}, "identical_after_truncation", "chosen",
     "same tokens as 'rejected' once tokenized (trailing EOS tokens are replaced by one)"),
    # An escaped lone surrogate (half an emoji) is valid JSON but not text.
    (GOOD, {**GOOD, "prompt": "The film was \ud83d"}, {}, "not_utf8", "prompt",
     "holds '\\ud83d' at character 14: half of a UTF-16 surrogate pair, which is not text (a character "
     "cut in two); remove it or write the whole character"),
    (GOOD_CHAT, {**GOOD_CHAT, "chosen": [{"role": "assistant", "content": "Eight \udc00"}]}, {}, "not_utf8",
     "chosen[0].content", "holds '\\udc00' at character 7: half of a UTF-16 surrogate pair, which is not "
     "text (a character cut in two); remove it or write the whole character"),
]


@pytest.mark.parametrize("good,bad,data,reason,field,message", CASES,
                         ids=[f"{c[3]}-{i}" for i, c in enumerate(CASES)])
def test_bad_row_message_names_file_row_and_field(tmp_path, tiny_tokenizer, good, bad, data, reason, field, message):
    path = write_lines(tmp_path / "data.jsonl", [good, bad])
    checked = check(cfg_for(path, **data), tiny_tokenizer)
    (problem,) = checked.report.problems
    assert (problem.reason, problem.row, problem.field) == (reason, 2, field)
    where = f", field '{field}'" if field is not None else ""
    assert str(problem) == f"{path}: line 2 (1-based){where}: {message}"
    assert problem.reason in REASONS
    assert checked.table.num_rows == 1 and checked.report.dropped == {reason: 1}


def test_every_reason_is_exercised():
    assert {c[3] for c in CASES} | {"bad_json", "template_error"} == set(REASONS)


def test_unparseable_json_line_is_a_bad_row(tmp_path, tiny_tokenizer):
    path = write_lines(tmp_path / "data.jsonl", [GOOD, '{"prompt": "Hi", "chosen": ', "", GOOD, "[1, 2]"])
    problems = check(cfg_for(path), tiny_tokenizer).report.problems
    assert [(p.reason, p.row) for p in problems] == [("bad_json", 2), ("bad_json", 5)]
    assert str(problems[0]).startswith(f"{path}: line 2 (1-based): not valid JSON: ")
    assert str(problems[1]) == f"{path}: line 5 (1-based): expected a JSON object, got list"


def test_chat_template_that_does_not_extend_the_prompt(tmp_path, tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    # A template whose generation prompt is not part of the rendered conversation.
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    path = write_lines(tmp_path / "chat.jsonl", [GOOD_CHAT])
    (problem,) = check(cfg_for(path), tokenizer).report.problems
    assert problem.reason == "template_error"
    assert str(problem) == (f"{path}: line 1 (1-based), field 'chosen': the chat template does not "
                            "render the prompt (with the generation prompt) as a prefix of the whole conversation")


def test_chat_template_error_names_the_field_whose_message_it_failed_on(tmp_path, tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if 'Forbidden' in m['content'] %}"
        "{{ raise_exception('no Forbidden in a ' + m['role'] + ' message') }}{% endif %}{% endfor %}"
        + tiny_tokenizer.chat_template
    )
    forbidden = {"role": "assistant", "content": "Forbidden."}
    path = write_lines(tmp_path / "chat.jsonl", [
        GOOD_CHAT, {**GOOD_CHAT, "rejected": [forbidden]},
        {**GOOD_CHAT, "prompt": [{"role": "user", "content": "Forbidden?"}]},
    ])
    problems = check(cfg_for(path), tokenizer).report.problems
    assert [(p.row, p.reason, p.field) for p in problems] == [
        (2, "template_error", "rejected"), (3, "template_error", "prompt")]
    assert problems[0].message == "the chat template failed: no Forbidden in a assistant message"


def test_rows_of_parquet_and_csv_are_numbered_from_one(tmp_path, tiny_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([GOOD, GOOD, {**GOOD, "chosen": ""}]), tmp_path / "d.parquet")
    (problem,) = check(cfg_for(tmp_path / "d.parquet"), tiny_tokenizer).report.problems
    assert str(problem) == f"{tmp_path / 'd.parquet'}: row 3 (1-based), field 'chosen': empty text"
    (tmp_path / "d.csv").write_text('prompt,chosen,rejected\nHi, Hello., Bye.\nHi,,"Bye."\n')
    (problem,) = check(cfg_for(tmp_path / "d.csv"), tiny_tokenizer).report.problems
    assert str(problem) == f"{tmp_path / 'd.csv'}: row 2 (1-based), field 'chosen': empty text"


def test_on_bad_row_error_lists_every_problem_and_writes_nothing(tmp_path, tiny_tokenizer):
    path = write_lines(tmp_path / "data.jsonl", [GOOD, {**GOOD, "rejected": " great."}, GOOD, {**GOOD, "prompt": ""}])
    with pytest.raises(DataError) as err:
        prepare(cfg_for(path), tiny_tokenizer, tmp_path / "out")
    lines = str(err.value).splitlines()
    assert lines[0] == f"2 bad row(s) in {path} (fix them, or set data.on_bad_row=skip to drop them):"
    assert lines[1] == f"{path}: line 2 (1-based), field 'chosen': same completion as 'rejected'"
    assert lines[2] == f"{path}: line 4 (1-based), field 'prompt': empty text"
    assert not (tmp_path / "out").exists()


def test_on_bad_row_skip_logs_a_summary_by_reason(tmp_path, tiny_tokenizer, caplog):
    path = write_lines(tmp_path / "data.jsonl", [
        GOOD, {**GOOD, "rejected": " great."}, {**GOOD, "chosen": " fun.", "rejected": " fun."},
        {**GOOD, "prompt": ""}, {**GOOD, "chosen": " A very long answer that goes on " * 8},
    ])
    with caplog.at_level(logging.WARNING, logger="prefopt.data"):
        td = prepare(cfg_for(path, on_bad_row="skip", max_length=20, max_prompt_length=10), tiny_tokenizer, tmp_path / "o")
    assert td.num_rows == 2
    assert td.report.dropped == {"empty": 1, "identical": 2}
    assert td.report.truncated == {"chosen": 1}
    assert [r["row"] for r in td.rows([0, 1])] == [1, 5]
    summary = caplog.records[0].getMessage()
    assert summary == (f"data: skipping bad rows: {path}: format preference; kept 2 of 5 rows; "
                       "dropped 3 (empty 1, identical 2); completions truncated to data.max_length: chosen 1")
    assert f"data: skipped {path}: line 2 (1-based), field 'chosen': same completion as 'rejected'" in caplog.messages
    # Truncation keeps the first tokens and drops the EOS: the completion did not end there.
    row = td.rows([1])[0]
    assert len(row["prompt_ids"]) + len(row["chosen_ids"]) == 20
    assert td.eos_token_id not in row["chosen_ids"]
    assert row["rejected_ids"][-1] == td.eos_token_id


@pytest.mark.parametrize("rows,data,message", [
    ([{"prompt": "Hi", "chosen": " a", "rejected": " b", "score": 1}], {},
     "extra column(s) score not read by format preference (columns prompt, chosen, rejected); "
     "rename them, or list them in data.ignore_columns to drop them"),
    ([{"question": "Hi", "chosen": " a", "rejected": " b"}], {},
     "extra column(s) question not read by format implicit_prompt"),
    ([{"prompt": "Hi", "chosen": " a", "rejected_response": " b"}], {"format": "preference"},
     "format preference needs column(s) rejected; the data has prompt, chosen, rejected_response "
     "(did you mean 'rejected_response' -> 'rejected'?)"),
    ([{"text": "Hi"}], {}, "cannot tell the data format from its columns (text); expected one of  "
     "unpaired: prompt, completion, label; preference: prompt, chosen, rejected; "
     "implicit_prompt: chosen, rejected; prompt_only: prompt"),
])
def test_missing_extra_and_unknown_columns_stop_whatever_on_bad_row_says(tmp_path, tiny_tokenizer, rows, data, message):
    path = write_lines(tmp_path / "data.jsonl", rows)
    with pytest.raises(DataError, match="^" + __import__("re").escape(f"{path}: {message}")):
        check(cfg_for(path, on_bad_row="skip", **data), tiny_tokenizer)


def test_ignored_columns_are_dropped(tmp_path, tiny_tokenizer):
    path = write_lines(tmp_path / "data.jsonl", [{**GOOD, "score": 3, "id": "a1"}])
    checked = check(cfg_for(path, ignore_columns=["score", "id"]), tiny_tokenizer)
    assert checked.table.num_rows == 1 and checked.spec.name == "preference"


def test_source_problems(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match="no such file or directory"):
        check(cfg_for(tmp_path / "missing.jsonl"), tiny_tokenizer)
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(DataError, match=r"unknown file type '\.txt'"):
        check(cfg_for(tmp_path / "data.txt"), tiny_tokenizer)
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="cannot read as Parquet"):
        check(cfg_for(tmp_path / "bad.parquet"), tiny_tokenizer)
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(DataError, match="holds messages, but the tokenizer has no chat template"):
        check(cfg_for(write_lines(tmp_path / "c.jsonl", [GOOD_CHAT])), tokenizer)

"""Examples -> token ids, with the prompt and each completion kept apart so masks are exact.

Rendering
- Text formats: the prompt is tokenized as the tokenizer does by default (so with BOS when the
  tokenizer adds one; never two), each completion without special tokens.
- Message formats: the prompt is the chat template applied to the prompt messages with
  `add_generation_prompt=True`; the completion is what the template adds for the assistant turn
  (the full conversation's rendering minus the prompt's, which must be its prefix). The template
  is rendered to text and tokenized with add_special_tokens=False: it emits its own BOS.

EOS: every completion ends with exactly one EOS. Trailing EOS tokens (the one a chat template
emits, or one a user already wrote) are removed and one is appended, so there are never two;
whitespace a template writes after its EOS is dropped. An EOS *inside* a completion is a bad row
(eos_in_text): the model would learn to stop there.

Truncation policy (counted in the report; docs/data.md)
- A prompt is never cut: one longer than `max_prompt_length` tokens is a bad row (no_room).
  Cutting a prompt changes the question and, for chat templates, breaks the conversation.
- A completion longer than `max_length - len(prompt)` keeps its first tokens and loses its EOS
  (it did not end there; an EOS would teach the model to stop mid-sentence).
- A pair whose chosen and rejected tokens are equal after that is a bad row
  (identical_after_truncation): it carries no preference.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from prefopt.data.errors import DataError, Problem
from prefopt.data.formats import FormatSpec
from prefopt.data.sources import Source
from prefopt.data.validate import BadRow, Example


def pad_token_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS (padding is masked
    wherever it could be read, so which id only has to be a real one)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@dataclass
class Encoded:
    """Tokenized examples as columns (one list per column, one entry per kept example)."""

    columns: dict[str, list]
    problems: list[Problem]
    truncated: Counter = field(default_factory=Counter)  # completion field -> rows truncated


def _batch_encoder(tokenizer) -> Callable[[list[str]], list[list[int]]]:
    """texts -> ids without special tokens, one batched call (the Rust tokenizer is much faster
    on batches). A fast tokenizer's backend is called directly, without offsets: half the time
    of tokenizer(texts), same ids (transformers only wraps each result in Python objects)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if not getattr(tokenizer, "is_fast", False) or not hasattr(backend, "encode_batch_fast") \
            or getattr(tokenizer, "split_special_tokens", False):
        return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    tokenizer(["a"], add_special_tokens=False)  # resets padding/truncation a caller may have left on
    return lambda texts: [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]


def _adds_bos(tokenizer) -> bool:
    """Does the tokenizer put BOS in front of a text by default (as Llama's does)?"""
    bos = tokenizer.bos_token_id
    with_specials = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bos is not None and with_specials[:1] == [bos] and without[:1] != [bos]


def _render(example: Example, spec: FormatSpec, tokenizer, eos: str) -> tuple[str, list[str]]:
    """(prompt text, completion texts) for one example."""
    if not spec.messages:
        return example.prompt, list(example.completions)

    # Rendered one at a time, so that an error names the field whose messages it failed on.
    def render(field: str, messages: list[dict], **kwargs) -> str:
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
        except Exception as exc:  # jinja2 errors, raise_exception() in templates, ...
            raise BadRow(field, "template_error", f"the chat template failed: {exc}") from None

    prompt = render("prompt", example.prompt, add_generation_prompt=True)
    fulls = [render(name, example.prompt + messages)
             for name, messages in zip(spec.completions, example.completions, strict=True)]
    completions = []
    for name, full in zip(spec.completions, fulls, strict=True):
        if not full.startswith(prompt):
            raise BadRow(name, "template_error",
                         "the chat template does not render the prompt (with the generation "
                         "prompt) as a prefix of the whole conversation")
        text = full[len(prompt):]
        end = text.rfind(eos)
        if end >= 0 and not text[end + len(eos):].strip():
            text = text[: end + len(eos)]  # drop a template's newline after the turn's EOS
        completions.append(text)
    return prompt, completions


def _identical_after_truncation(fulls: list[list[int]], budget: int, prompt_tokens: int,
                                max_length: int) -> BadRow:
    """The bad row for a pair whose tokens are equal once cut, naming what to change."""
    chosen, rejected = fulls
    if chosen == rejected:  # equal before any cut: texts that differ only in a trailing EOS, say
        return BadRow("chosen", "identical_after_truncation",
                      "same tokens as 'rejected' once tokenized (trailing EOS tokens are "
                      "replaced by one)")
    # Both rows are fine; data.max_length is what makes them equal, so no field is named.
    differ = next(i for i, (a, b) in enumerate(zip(chosen, rejected, strict=False)) if a != b)
    return BadRow(None, "identical_after_truncation",
                  f"chosen and rejected have the same first {budget} tokens, all that "
                  f"data.max_length={max_length} leaves after the {prompt_tokens}-token prompt; "
                  f"they differ from token {differ + 1}: raise data.max_length to at least "
                  f"{prompt_tokens + differ + 1}, or skip such rows")


def encode(examples: list[Example], spec: FormatSpec, source: Source, tokenizer, *,
           max_length: int, max_prompt_length: int) -> Encoded:
    """Tokenize, end with one EOS, apply the truncation policy; refuse what cannot be fixed."""
    eos_id, bos_id = tokenizer.eos_token_id, tokenizer.bos_token_id
    if eos_id is None:
        raise DataError("the tokenizer has no EOS token; completions must end with one")
    if spec.messages and not tokenizer.chat_template:
        raise DataError(f"{source.name}: format {spec.name} holds messages, "
                        "but the tokenizer has no chat template")
    add_bos = not spec.messages and _adds_bos(tokenizer)
    problems: list[Problem] = []

    rendered, kept = [], []
    for ex in examples:
        try:
            rendered.append(_render(ex, spec, tokenizer, tokenizer.eos_token))
            kept.append(ex)
        except BadRow as bad:
            problems.append(Problem(source.name, ex.row, bad.field, bad.reason, bad.message, source.row_word))

    batch = _batch_encoder(tokenizer)

    prompt_ids = batch([p for p, _ in rendered])
    completion_ids = [batch([c[i] for _, c in rendered]) for i in range(len(spec.completions))]

    names = spec.completions
    columns: dict[str, list] = {"row": [], "prompt_ids": [], **{f"{n}_ids": [] for n in names}}
    if spec.kind == "unpaired":
        columns["label"] = []
    if spec.kind == "prompt":
        columns["prompt"] = []
    truncated: Counter = Counter()
    for j, ex in enumerate(kept):
        try:
            prompt = prompt_ids[j]
            if add_bos and prompt[:1] != [bos_id]:
                prompt = [bos_id, *prompt]
            if bos_id is not None and prompt[:2] == [bos_id, bos_id]:
                prompt = prompt[1:]  # a template's BOS plus one written in the text
            if len(prompt) > max_prompt_length:
                raise BadRow("prompt", "no_room",
                             f"the prompt has {len(prompt)} tokens, more than data.max_prompt_length="
                             f"{max_prompt_length}: it leaves no room for the completion within "
                             f"data.max_length={max_length} (prompts are never cut; raise both, "
                             "or skip such rows)")
            budget = max_length - len(prompt)
            fulls, outs, cut = [], [], []
            for name, ids_by_row in zip(names, completion_ids, strict=True):
                ids = list(ids_by_row[j])
                while ids and ids[-1] == eos_id:
                    ids.pop()
                if eos_id in ids:
                    raise BadRow(name, "eos_in_text",
                                 f"contains the EOS token {tokenizer.eos_token!r} before its end "
                                 "(the model would learn to stop there)")
                ids.append(eos_id)
                fulls.append(ids)
                cut.append(len(ids) > budget)
                outs.append(ids[:budget])
            if spec.kind == "pair" and outs[0] == outs[1]:
                raise _identical_after_truncation(fulls, budget, len(prompt), max_length)
        except BadRow as bad:
            problems.append(Problem(source.name, ex.row, bad.field, bad.reason, bad.message, source.row_word))
            continue
        truncated.update(name for name, c in zip(names, cut, strict=True) if c)
        columns["row"].append(ex.row)
        columns["prompt_ids"].append(prompt)
        for name, ids in zip(names, outs, strict=True):
            columns[f"{name}_ids"].append(ids)
        if spec.kind == "unpaired":
            columns["label"].append(ex.label)
        if spec.kind == "prompt":
            columns["prompt"].append(rendered[j][0])
    return Encoded(columns, problems, truncated)

"""The LLM judge behind an OpenAI-compatible HTTP endpoint (`reward.judge.endpoint`).

Each question goes to POST {endpoint}/completions twice, as question + answer for each of the two
answers, with `echo`, `max_tokens: 0` and `logprobs`: the server returns the log-prob of every
prompt token given the tokens before it (how lm-evaluation-harness reads log-likelihoods from
vLLM's OpenAI server). The answer's first token is found through `text_offset`, and the two
log-probs are renormalised over the two answers, as RewardWorker.judge does with its next-token
probabilities: the server tokenizes, nothing is tokenized here.

The offsets are counted back from the end of the prompt, where the answer is: vLLM counts the
text of the BOS it adds, and in byte-level vocabularies one character per byte of a non-ASCII
character, so its offsets drift from the prompt's characters before the answer, not within it.
"""

from __future__ import annotations

import bisect
import http.client
import json
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from prefopt.config import JudgeConfig
from prefopt.errors import SERVICE, UserError

BACKOFF_S = (1.0, 2.0)  # the waits before each retry of a request that met no server or a 5xx


class JudgeEndpointError(UserError, RuntimeError):
    """The judge endpoint cannot be used; the message says what to change."""

    exit_code = SERVICE

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status  # the HTTP status that said no, if one did


class _Retryable(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _server_message(body: bytes) -> str:
    """The server's own words from an error body (OpenAI's, vLLM's or plain text), one short line."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict):
            error = error.get("message") or error.get("detail") or error
        text = error if isinstance(error, str) else json.dumps(error)
    text = " ".join(text.split())
    return text[:300] + ("..." if len(text) > 300 else "") if text else "(no message)"


def _call(judge: JudgeConfig, path: str, body: dict | None = None, timeout_s: float | None = None) -> dict:
    """One request; JSON back. An HTTP error status other than 5xx is a JudgeEndpointError saying
    what the server said; no answer at all, or a 5xx, is _Retryable."""
    url = judge.endpoint.rstrip("/") + path
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    key = os.environ.get(judge.api_key_env)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s or judge.timeout_s) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        message = _server_message(exc.read())
        if exc.code >= 500:
            raise _Retryable(f"HTTP {exc.code}: {message}") from None
        if exc.code in (401, 403):
            how = (f"check that {judge.api_key_env} holds its API key" if key else
                   f"{judge.api_key_env} is not set: put its API key there (or name another variable in "
                   "reward.judge.api_key_env)")
            raise JudgeEndpointError(f"reward.judge.endpoint: {url} refused the request (HTTP {exc.code}: "
                                     f"{message}); {how}", exc.code) from None
        raise JudgeEndpointError(f"reward.judge.endpoint: {url} answered HTTP {exc.code}: {message}",
                                 exc.code) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, cut off
        raise _Retryable(str(getattr(exc, "reason", exc))) from None
    try:
        return json.loads(raw)
    except ValueError:
        raise JudgeEndpointError(f"reward.judge.endpoint: {url} answered with no JSON: "
                                 f"{_server_message(raw)}") from None


def _unreachable(judge: JudgeConfig, reason: str) -> JudgeEndpointError:
    slow = ", or raise reward.judge.timeout_s" if "timed out" in reason else ""
    return JudgeEndpointError(f"reward.judge.endpoint: no judge server answers at {judge.endpoint} ({reason}); "
                              f"start it (e.g. vllm serve MODEL), or fix the address{slow}")


def check_endpoint(judge: JudgeConfig) -> None:
    """Fail in seconds, before any scoring, when no server answers, it refuses the token, or it
    lists its models and reward.judge.model is not one of them."""
    try:
        listed = _call(judge, "/models", timeout_s=min(judge.timeout_s, 10.0))
    except _Retryable as exc:
        raise _unreachable(judge, exc.reason) from None
    except JudgeEndpointError as exc:
        if exc.status in (404, 405):
            return  # a server without a model list: the first request says whether the model is there
        raise
    served = [m.get("id") for m in listed.get("data") or [] if isinstance(m, dict)]
    if served and judge.model not in served:
        raise JudgeEndpointError(f"reward.judge.model: {judge.endpoint} serves no model {judge.model!r} "
                                 f"(it serves {', '.join(map(str, served))})")


def _with_retries(judge: JudgeConfig, body: dict) -> dict:
    for attempt in range(len(BACKOFF_S) + 1):
        try:
            return _call(judge, "/completions", body)
        except _Retryable as exc:
            if attempt < len(BACKOFF_S):
                time.sleep(BACKOFF_S[attempt])
            elif exc.reason.startswith("HTTP "):
                raise JudgeEndpointError(f"reward.judge.endpoint: {judge.endpoint}/completions answered "
                                         f"{exc.reason} ({attempt + 1} tries)") from None
            else:
                raise _unreachable(judge, exc.reason) from None


def answer_logprob(choice: dict, prompt: str, answer: str, endpoint: str) -> float:
    """log p(answer's first token | the question before it) from one echoed choice of `prompt`
    (= question + answer)."""
    logprobs = choice.get("logprobs") or {}
    tokens, offsets, values = (logprobs.get(k) for k in ("tokens", "text_offset", "token_logprobs"))
    if not (tokens and offsets and values) or not len(tokens) == len(offsets) == len(values):
        raise JudgeEndpointError(f"reward.judge.endpoint: {endpoint} returned no prompt log-probs (tokens, "
                                 "text_offset, token_logprobs); the judge server must support echo + logprobs "
                                 "on /completions (vLLM's OpenAI server does)")
    text = choice.get("text")
    if text and text != prompt and text.startswith(prompt):
        raise JudgeEndpointError(f"reward.judge.endpoint: {endpoint} generated text after the prompt; the judge "
                                 "server must honour max_tokens 0 with echo (vLLM's OpenAI server does)")
    start = offsets[-1] + len(tokens[-1]) - len(answer)
    k = bisect.bisect_left(offsets, start)
    if k == len(offsets) or offsets[k] != start or values[k] is None:
        raise JudgeEndpointError(f"reward.judge.answers: {answer!r} does not start a token of its own after the "
                                 f"question at {endpoint} (its tokenizer joins it to the question's last "
                                 "characters); end the template so that the answer starts a token, e.g. with the "
                                 "space in the answer, not the template")
    return float(values[k])


def _score_chunk(judge: JudgeConfig, questions: Sequence[str], answers: Sequence[str]) -> list[float]:
    prompts = [q + a for q in questions for a in answers]
    body = {"model": judge.model, "prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 1,
            "temperature": 0.0}
    choices = sorted(_with_retries(judge, body).get("choices") or [], key=lambda c: c.get("index", 0))
    if len(choices) != len(prompts):
        raise JudgeEndpointError(f"reward.judge.endpoint: {judge.endpoint} answered {len(choices)} choices for "
                                 f"{len(prompts)} prompts")
    lp = [answer_logprob(choice, prompt, answers[i % 2], judge.endpoint)
          for i, (choice, prompt) in enumerate(zip(choices, prompts, strict=True))]
    return [first_of_two(lp[i], lp[i + 1]) for i in range(0, len(lp), 2)]


def first_of_two(logprob_a: float, logprob_b: float) -> float:
    """p(a) / (p(a) + p(b)): the vocabulary's normaliser cancels, as in the local judge's softmax
    over the two answers. A sigmoid of the difference, on the side where exp cannot overflow
    (servers send -9999 for a log-prob of -inf)."""
    d = logprob_a - logprob_b
    return 1.0 / (1.0 + math.exp(-d)) if d >= 0 else math.exp(d) / (1.0 + math.exp(d))


def score(judge: JudgeConfig, questions: Sequence[str], answers: Sequence[str]) -> list[float]:
    """p(answers[0]) / (p(answers[0]) + p(answers[1])) after each question, from the endpoint,
    `judge.requests_in_flight` requests at a time."""
    from concurrent.futures import ThreadPoolExecutor

    size = judge.questions_per_request
    chunks = [questions[s : s + size] for s in range(0, len(questions), size)]
    with ThreadPoolExecutor(judge.requests_in_flight) as pool:
        futures = [pool.submit(_score_chunk, judge, chunk, answers) for chunk in chunks]
        try:
            return [p for future in futures for p in future.result()]
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # the first error ends the run: send no more
            raise

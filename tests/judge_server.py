"""A small OpenAI-compatible judge server for tests: a real causal LM behind GET /v1/models and
POST /v1/completions with echo + logprobs over the prompt (max_tokens 0), on 127.0.0.1.

It answers as vLLM's OpenAI server does: the first prompt token's log-prob is null, `tokens` are
each token's own text (the BOS's text included, one replacement character per partial byte of a
non-ASCII character), and `text_offset` adds up their lengths, so the offsets drift from the
prompt's characters exactly where vLLM's do. An optional bearer token is checked on every
request, as `vllm serve --api-key` does.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class JudgeServer:
    """`with JudgeServer(model_dir) as server:` serves at `server.url` until the block ends.

    logprobs=False answers without log-probs (a server that cannot echo them); fail_first=N
    answers the first N completion requests with HTTP 503 (an overloaded server)."""

    def __init__(self, model_dir: str | Path, *, name: str = "tiny-judge", token: str | None = None,
                 logprobs: bool = True, fail_first: int = 0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name, self.token, self.logprobs, self.fail_first = name, token, logprobs, fail_first
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.completion_requests = 0  # POST /v1/completions received, failed ones included
        self._lock = threading.Lock()
        self._http: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}/v1"

    def __enter__(self) -> JudgeServer:
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)  # port 0: a free one
        self._http.judge = self
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._http.shutdown()
        self._http.server_close()

    def echo(self, prompt: str, top: int) -> dict:
        """The choice of one prompt: every prompt token with its log-prob given the ones before."""
        import torch

        ids = self.tokenizer(prompt)["input_ids"]
        with self._lock, torch.no_grad():  # one forward at a time: the handler threads share the model
            logp = torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), dim=-1)
        text = [self.tokenizer.convert_tokens_to_string([t]) for t in self.tokenizer.convert_ids_to_tokens(ids)]
        offsets = [sum(len(t) for t in text[:i]) for i in range(len(ids))]
        token_logprobs: list[float | None] = [None] + [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]
        top_logprobs: list[dict | None] = [None]
        for i in range(1, len(ids)):
            best = torch.topk(logp[i - 1], top).indices.tolist()
            top_logprobs.append({self.tokenizer.decode([t]): logp[i - 1, t].item() for t in [*best, ids[i]]})
        return {"text": prompt, "finish_reason": "length",
                "logprobs": {"tokens": text, "token_logprobs": token_logprobs, "text_offset": offsets,
                             "top_logprobs": top_logprobs} if self.logprobs else None}


class _Handler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer

    def log_message(self, *args) -> None:  # quiet: pytest shows what the tests print
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": {"message": message, "type": "invalid_request_error", "code": status}})

    def _authorized(self) -> bool:
        judge: JudgeServer = self.server.judge
        if judge.token and self.headers.get("Authorization") != f"Bearer {judge.token}":
            self._send(401, {"error": "Unauthorized"})  # vLLM's words for a missing or wrong --api-key
            return False
        return True

    def do_GET(self) -> None:
        if not self._authorized():
            return
        if self.path.rstrip("/") != "/v1/models":
            return self._error(404, f"no route {self.path}")
        self._send(200, {"object": "list", "data": [{"id": self.server.judge.name, "object": "model"}]})

    def do_POST(self) -> None:
        judge: JudgeServer = self.server.judge
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if not self._authorized():
            return
        if self.path.rstrip("/") != "/v1/completions":
            return self._error(404, f"no route {self.path}")
        with judge._lock:
            judge.completion_requests += 1
            overloaded = judge.completion_requests <= judge.fail_first
        if overloaded:
            return self._error(503, "the server is overloaded")
        if body.get("model") != judge.name:
            return self._error(404, f"The model `{body.get('model')}` does not exist.")
        if not body.get("echo") or body.get("max_tokens") != 0 or not isinstance(body.get("logprobs"), int):
            return self._error(400, "this test server only echoes prompt log-probs (echo, max_tokens 0, logprobs)")
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        choices = [{"index": i, **judge.echo(p, max(body["logprobs"], 1))} for i, p in enumerate(prompts)]
        self._send(200, {"id": f"cmpl-{time.monotonic_ns()}", "object": "text_completion", "created": int(time.time()),
                         "model": judge.name, "choices": choices})

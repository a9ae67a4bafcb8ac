"""The LLM judge behind an OpenAI-compatible endpoint: a real HTTP server on 127.0.0.1 (tests/
judge_server.py, answering as vLLM's does) with the tiny LM behind it scores what the local judge
scores, a position preference still cancels pairwise, and an endpoint that cannot be used stops
label in one line."""

import io
import json
import math
import socket
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from judge_server import JudgeServer
from rich.console import Console
from typer.testing import CliRunner

from prefopt import shards
from prefopt.algorithms import generate, judge_http, label
from prefopt.cli import app
from prefopt.config import ConfigError, load_config
from prefopt.storage import Store

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ONPOLICY = ROOT / "configs/tiny/onpolicy.yaml"
KEY_ENV = "PREFOPT_TEST_JUDGE_KEY"
PAIRWISE = ["reward.judge.mode=pairwise", "reward.judge.template=Start: {prompt} A: {a} B: {b} Which is better?",
            "reward.judge.answers=[' A', ' B']"]

# Two prompts, three completions each; one holds non-ASCII text, where vLLM's offsets drift.
TABLE = {
    "prompt_index": [0, 0, 0, 1, 1, 1],
    "sample": [0, 1, 2, 0, 1, 2],
    "prompt": ["The movie was"] * 3 + ["I watched this film and"] * 3,
    "completion": [" a delight from start to finish.", " boring and far too long.", " très bien, 映画 ☺ loved it",
                   " fell asleep twice.", " laughed the whole way through!", " it was fine, I guess."],
}


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def config(tmp_path, model_dir, *overrides):
    return load_config(ONPOLICY, [f"model.path={model_dir}", f"output_dir={tmp_path / 'run'}",
                                  "reward.source=judge", *overrides])


def served(server: JudgeServer, *overrides) -> list[str]:
    return [f"reward.judge.endpoint={server.url}", f"reward.judge.model={server.name}",
            f"reward.judge.api_key_env={KEY_ENV}", *overrides]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with JudgeServer(tiny_model_dir) as s:
        yield s


@pytest.fixture(scope="module")
def position_judge_dir(tiny_model_dir, tmp_path_factory):
    """The tiny LM made blind to what it is shown (every token embeds alike, so every hidden state is
    the same vector), whose output layer then prefers answer " A" over " B" by a logit of 3."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.tie_word_embeddings = False
    with torch.no_grad():
        model.model.embed_tokens.weight[:] = model.model.embed_tokens.weight[100].clone()  # row 0 is the zero pad
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.clone())
        h = model.model.norm(model.model(torch.tensor([[5, 6, 7]])).last_hidden_state[0, -1])
        a, b = (tok(x, add_special_tokens=False).input_ids[0] for x in (" A", " B"))
        model.lm_head.weight[a] = model.lm_head.weight[b] + 3.0 * h / h.dot(h)
    out = tmp_path_factory.mktemp("position-judge")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("mode", ["rating", "pairwise"])
def test_the_served_judge_scores_what_the_local_judge_scores(mode, tmp_path, tiny_model_dir, server, ray_local,
                                                             capsys):
    asked = PAIRWISE if mode == "pairwise" else []
    start = time.perf_counter()
    local = label.score_with_judge(config(tmp_path, tiny_model_dir, f"reward.model_path={tiny_model_dir}", *asked),
                                   TABLE, quiet())
    local_s = time.perf_counter() - start
    start, before = time.perf_counter(), server.completion_requests
    http = label.score_with_judge(config(tmp_path, tiny_model_dir, *served(server, *asked,
                                                                            "reward.judge.questions_per_request=5")),
                                  TABLE, quiet())
    http_s = time.perf_counter() - start
    gap = max(abs(x - y) for x, y in zip(http, local, strict=True))
    with capsys.disabled():
        print(f"\n  {mode}: max |http - local| = {gap:.2e}; local {local_s:.1f} s, http {http_s:.1f} s")
    assert gap < 1e-5
    assert max(local) - min(local) > 1e-3  # the judge tells the completions apart: the match says something
    questions = 6 if mode == "rating" else 12  # pairwise: both orders of each of 3 + 3 pairs
    assert server.completion_requests - before == -(-questions // 5)


def test_a_served_position_preference_rates_alike_and_cancels_pairwise(tmp_path, tiny_model_dir, position_judge_dir):
    with JudgeServer(position_judge_dir) as blind:
        rated = label.score_with_judge(config(tmp_path, tiny_model_dir, *served(
            blind, "reward.judge.answers=[' A', ' B']", "reward.judge.template=Start: {prompt} End: {completion} Good?")),
            TABLE, quiet())
        paired = label.score_with_judge(config(tmp_path, tiny_model_dir, *served(blind, *PAIRWISE)), TABLE, quiet())
    assert rated == pytest.approx([1 / (1 + math.exp(-3))] * 6, abs=1e-4)  # sigmoid(3): its taste for " A"
    assert paired == pytest.approx([0.5] * 6, abs=1e-6)


def write_generated(directory: Path) -> None:
    """TABLE as the output of `prefopt generate`: what label reads."""
    (shard,) = shards.plan(6, 6, digits=5)
    manifest = {"fingerprint": "TABLE", "shards": shards.plan_entries([shard]), "num_shards": 1, "num_prompts": 2,
                "eos_token": "<|eos|>"}
    shards.write_manifest(Store.at(directory), manifest)
    generate.samples_at(Store.at(directory), manifest).write(shard, pa.table(
        {**TABLE, "completion_tokens": [5] * 6, "logprob": [-1.0] * 6, "finished": [True] * 6}))


def invoke(*args: str):
    return CliRunner().invoke(app, [args[0], str(ONPOLICY), *(a for s in args[1:] for a in ("--set", s))])


def test_prefopt_label_with_a_served_judge_behind_a_token(tmp_path, tiny_model_dir, monkeypatch):
    write_generated(tmp_path / "run" / "generated")
    monkeypatch.setenv(KEY_ENV, "s3cret")
    with JudgeServer(tiny_model_dir, token="s3cret") as locked:
        sets = [f"model.path={tiny_model_dir}", f"output_dir={tmp_path / 'run'}", "reward.source=judge",
                *served(locked), "label.pairs=all_pairs"]
        result = invoke("label", *sets)
        assert result.exit_code == 0, result.output
        assert f"scored by the judge tiny-judge at {locked.url}" in " ".join(result.output.split())  # unwrapped
        out = tmp_path / "run" / "labelled"
        rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
        assert rows and all(set(r) == {"prompt", "chosen", "rejected"} for r in rows)
        scorer = json.loads((out / "manifest.json").read_text())["scorer"]
        assert scorer["endpoint"] == locked.url and scorer["model"] == "tiny-judge" and "model_path" not in scorer
        scores = pq.read_table(out / "scores.parquet").to_pydict()["score"]
        assert len(scores) == 6 and all(0 < s < 1 for s in scores)

        # Same samples, same endpoint and model: the scores are reused, no request is sent.
        before = locked.completion_requests
        again = invoke("label", *sets, "label.pairs=best_worst")
        assert again.exit_code == 0 and "scores reused" in again.output and locked.completion_requests == before
    # Another endpoint or model is another judge: never its scores.
    cfg = config(tmp_path, tiny_model_dir, *served(locked))
    for field, value in (("endpoint", "http://127.0.0.1:1/v1"), ("model", "other")):
        other = cfg.model_copy(update={"reward": cfg.reward.model_copy(
            update={"judge": cfg.reward.judge.model_copy(update={field: value})})})
        assert label.scorer_description(other) != label.scorer_description(cfg)


def test_an_unreachable_endpoint_stops_label_in_one_line_before_anything_is_read(tmp_path, tiny_model_dir, capsys):
    url = f"http://127.0.0.1:{closed_port()}/v1"
    start = time.perf_counter()
    result = invoke("label", f"model.path={tiny_model_dir}", f"output_dir={tmp_path / 'run'}", "reward.source=judge",
                    f"reward.judge.endpoint={url}", "reward.judge.model=judge")
    seconds = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n  unreachable endpoint: exit {result.exit_code} after {seconds:.1f} s")
    assert result.exit_code == 4, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"no judge server answers at {url}" in errors[0], result.output
    assert "Traceback" not in result.output and seconds < 10
    # Before the generated samples were looked for (there are none) or anything was written.
    assert "generate first" not in result.output and not (tmp_path / "run").exists()


def test_a_refused_token_names_the_env_var(tmp_path, tiny_model_dir, monkeypatch):
    with JudgeServer(tiny_model_dir, token="s3cret") as locked:
        cfg = config(tmp_path, tiny_model_dir, *served(locked))
        monkeypatch.delenv(KEY_ENV, raising=False)
        with pytest.raises(judge_http.JudgeEndpointError, match=rf"HTTP 401: Unauthorized.*{KEY_ENV} is not set"):
            label.run(cfg, quiet())
        monkeypatch.setenv(KEY_ENV, "wrong")
        with pytest.raises(judge_http.JudgeEndpointError, match=rf"HTTP 401.*check that {KEY_ENV} holds its API key"):
            label.run(cfg, quiet())
        # Scoring itself (a token revoked after the check) says the same.
        with pytest.raises(judge_http.JudgeEndpointError, match=KEY_ENV):
            label.score_with_judge(cfg, TABLE, quiet())


def test_a_server_without_logprobs_or_the_model_is_refused_clearly(tmp_path, tiny_model_dir, server):
    with JudgeServer(tiny_model_dir, logprobs=False) as plain:
        with pytest.raises(judge_http.JudgeEndpointError, match=r"must support echo \+ logprobs on /completions"):
            label.score_with_judge(config(tmp_path, tiny_model_dir, *served(plain)), TABLE, quiet())
    other = config(tmp_path, tiny_model_dir, *served(server), "reward.judge.model=llama-70b")
    with pytest.raises(judge_http.JudgeEndpointError, match="serves no model 'llama-70b' \\(it serves tiny-judge\\)"):
        judge_http.check_endpoint(other.reward.judge)
    with pytest.raises(judge_http.JudgeEndpointError, match="HTTP 404: The model `llama-70b` does not exist"):
        label.score_with_judge(other, TABLE, quiet())


def test_an_answer_the_server_joins_to_the_question_is_refused(tmp_path, tiny_model_dir, server):
    # "Answer: " + "Yes" is tokenized [":", " Y", "es"]: no token starts where the answer does.
    joined = config(tmp_path, tiny_model_dir, *served(server, "reward.judge.answers=['Yes', 'No']",
                                                      "reward.judge.template='{prompt}{completion} Good? Answer: '"))
    with pytest.raises(judge_http.JudgeEndpointError, match="'Yes' does not start a token of its own"):
        label.score_with_judge(joined, TABLE, quiet())


def test_an_overloaded_server_is_retried_then_reported(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(judge_http, "BACKOFF_S", (0.01, 0.01))  # the waits, not the retries, made short
    with JudgeServer(tiny_model_dir, fail_first=2) as busy:
        cfg = config(tmp_path, tiny_model_dir, *served(busy, "reward.judge.questions_per_request=6"))
        assert len(label.score_with_judge(cfg, TABLE, quiet())) == 6
        assert busy.completion_requests == 3  # two 503s, then the answer
    with JudgeServer(tiny_model_dir, fail_first=3) as down:
        cfg = config(tmp_path, tiny_model_dir, *served(down, "reward.judge.questions_per_request=6"))
        with pytest.raises(judge_http.JudgeEndpointError, match=r"HTTP 503: the server is overloaded \(3 tries\)"):
            label.score_with_judge(cfg, TABLE, quiet())


@pytest.mark.parametrize(("sets", "says"), [
    (["reward.model_path=/models/judge", "reward.judge.endpoint=http://127.0.0.1:8000/v1", "reward.judge.model=j"],
     "has both model_path"),
    (["reward.judge.endpoint=http://127.0.0.1:8000/v1"], r"reward\.judge: model: a judge endpoint needs the name"),
    (["reward.judge.endpoint=127.0.0.1:8000/v1", "reward.judge.model=j"], "is no http"),
    ([], r"needs model_path \(a causal LM directory\) or judge\.endpoint"),
])
def test_judge_endpoint_config_is_checked_at_load(sets, says):
    with pytest.raises(ConfigError, match=says):
        load_config(ONPOLICY, ["reward.source=judge", *sets])

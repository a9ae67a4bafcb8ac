"""On-policy pairs end to end: `generate` samples the tiny model on a few task prompts into
resumable shards, `label` scores them (the task's truth, or a reward model with a scalar head)
and writes pairs that `train` reads as they are."""

import io
import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from rich.console import Console

from prefopt.algorithms import generate, label
from prefopt.config import load_config

ROOT = Path(__file__).resolve().parents[2]
ONPOLICY = ROOT / "configs/tiny/onpolicy.yaml"


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def config(tmp_path, model_dir, *overrides):
    return load_config(ONPOLICY, [f"model.path={model_dir}", f"output_dir={tmp_path / 'run'}", "data.num_examples=8",
                                  "generate.prompts_per_shard=3", "generate.sampling.max_new_tokens=12", *overrides])


def shards(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("shard-*.parquet"))}


def test_generate_resumes_label_scores_and_train_reads_the_pairs(tmp_path, tiny_model_dir, ray_local):
    from prefopt.algorithms import train

    cfg = config(tmp_path, tiny_model_dir)
    out = Path(generate.run(cfg, quiet()))
    first = shards(out)
    assert list(first) == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]  # 8 prompts, 3 a shard
    table = pq.read_table(out / "shard-00001.parquet").to_pydict()
    assert table["prompt_index"] == [i for i in (3, 4, 5) for _ in range(4)] and table["sample"] == [0, 1, 2, 3] * 3
    assert all(math.isfinite(x) and x <= 0 for x in table["logprob"])
    assert len(set(table["completion"])) > 3  # sampled, not greedy: a prompt's 4 samples differ
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 4 and manifest["num_prompts"] == 8 and len(manifest["generator_weights"]) == 64

    # Resume: a lost shard is recomputed alone, and comes out as it did the first time.
    (out / "shard-00001.parquet").unlink()
    kept = {n: (out / n).stat().st_mtime_ns for n in ("shard-00000.parquet", "shard-00002.parquet")}
    generate.run(cfg, quiet())
    assert shards(out) == first
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept

    # Other inputs into the same directory: refused, naming what differs.
    with pytest.raises(generate.GeneratedMismatch, match="num_samples"):
        generate.run(config(tmp_path, tiny_model_dir, "generate.num_samples=2"), quiet())

    # Label with the task's ground truth: all_pairs, the higher reward chosen.
    pairs_file = Path(label.run(cfg, quiet()))
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    assert rows and all(set(r) == {"prompt", "chosen", "rejected"} for r in rows)
    from prefopt.tasks import get_task

    reward = get_task("imdb_sentiment").reward
    for r in rows:
        chosen, rejected = reward([r["prompt"]] * 2, [r["chosen"], r["rejected"]])
        assert chosen > rejected
    scores = pq.read_table(pairs_file.parent / "scores.parquet").to_pydict()
    assert len(scores["score"]) == 32
    manifest = json.loads((pairs_file.parent / "manifest.json").read_text())
    assert manifest["scorer"] == {"source": "task", "task": "imdb_sentiment"} and manifest["pairs"] == "all_pairs"

    # prefopt train reads the labelled file as it is.
    trained = load_config(ONPOLICY, [f"model.path={tiny_model_dir}", f"output_dir={tmp_path / 'train'}",
                                     f"data.path={pairs_file}", "data.task=null", "data.num_examples=null",
                                     "train.max_steps=2", "policy.micro_batch_size=2"])
    result = train(trained, quiet())
    metrics = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    # The DPO run shows where its pairs came from: the labelled file, with generator and scorer.
    from mlflow import MlflowClient

    (inp,) = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(result.run_id).inputs.dataset_inputs
    assert inp.dataset.name == "pairs.jsonl" and json.loads(inp.dataset.source)["uri"] == str(pairs_file.resolve())
    made_by = json.loads(inp.dataset.profile)["made_by"]
    assert made_by["scorer"]["source"] == "task" and made_by["generator"]["num_samples"] == 4


def test_label_with_a_reward_model_of_its_own(tmp_path, tiny_model_dir, ray_local):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from prefopt.config import TinyModelConfig
    from prefopt.models import save_tiny

    # A reward model on ANOTHER tokenizer than the policy's (a smaller vocabulary, trained apart):
    # it must read the completions as text, with its own tokenizer.
    other = save_tiny(tmp_path / "other", TinyModelConfig(vocab_size=512, seed=3))
    rm_dir = tmp_path / "rm"
    rm = AutoModelForSequenceClassification.from_pretrained(other, num_labels=1)
    rm.save_pretrained(rm_dir)
    AutoTokenizer.from_pretrained(other).save_pretrained(rm_dir)
    assert len(AutoTokenizer.from_pretrained(rm_dir)) != len(AutoTokenizer.from_pretrained(tiny_model_dir))

    cfg = config(tmp_path, tiny_model_dir, "data.num_examples=4", "generate.sampling.max_new_tokens=6")
    # Before anything is generated: label says what to run first.
    with pytest.raises(label.LabelError, match="run prefopt generate first"):
        label.run(cfg, quiet())
    generate.run(cfg, quiet())
    (generate.output_dir(cfg) / "shard-00001.parquet").delete()
    with pytest.raises(label.LabelError, match=r"shard-00001\.parquet.*run prefopt generate first"):
        label.run(cfg, quiet())
    generate.run(cfg, quiet())

    # A causal LM is no reward model.
    with pytest.raises(label.LabelError, match="no scalar head"):
        label.run(config(tmp_path, tiny_model_dir, "reward.source=model", f"reward.model_path={tiny_model_dir}"),
                  quiet())

    by_model = config(tmp_path, tiny_model_dir, "data.num_examples=4", "generate.sampling.max_new_tokens=6",
                      "reward.source=model", f"reward.model_path={rm_dir}", "label.pairs=best_worst",
                      f"label.output_dir={tmp_path / 'by-model'}")
    pairs_file = Path(label.run(by_model, quiet()))
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    assert 1 <= len(rows) <= 4 and all(set(r) == {"prompt", "chosen", "rejected"} for r in rows)
    scored = pq.read_table(pairs_file.parent / "scores.parquet").to_pydict()
    manifest = json.loads((pairs_file.parent / "manifest.json").read_text())
    assert manifest["scorer"]["source"] == "model" and len(manifest["scorer"]["reward_weights"]) == 64

    # Another pairs mode over the same samples and scorer: the scores are reused, no worker starts.
    console = quiet()
    again = by_model.model_copy(update={"label": by_model.label.model_copy(update={"pairs": "all_pairs"})})
    label.run(again, console)
    assert "scores reused" in console.file.getvalue()
    assert pq.read_table(pairs_file.parent / "scores.parquet").to_pydict()["score"] == scored["score"]
    assert len(pairs_file.read_text().splitlines()) > len(rows)

    # Each score is the plain transformers model's output on prompt + completion + EOS, in its tokens.
    tok = AutoTokenizer.from_pretrained(rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    for i in (0, 5):
        ids = tok(scored["prompt"][i])["input_ids"] + tok(scored["completion"][i], add_special_tokens=False)[
            "input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits.item()
        assert scored["score"][i] == pytest.approx(expected, abs=1e-4)


def test_label_with_an_llm_judge(tmp_path, tiny_model_dir, ray_local):
    """The judge is a causal LM read through its answer-token probabilities. A judge blind to what
    it is shown but fond of the first position rates every completion alike, far from 0.5; asked
    pairwise in both orders, its preference cancels: every completion scores 0.5."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = config(tmp_path, tiny_model_dir, "data.num_examples=3", "generate.sampling.max_new_tokens=6")
    generate.run(cfg, quiet())

    # A real tiny LM made content-blind: every token embeds alike, so every hidden state is the
    # same vector whatever the text; its output layer then prefers answer " A" by a logit of 3.
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.tie_word_embeddings = False
    with torch.no_grad():
        model.model.embed_tokens.weight[:] = model.model.embed_tokens.weight[100].clone()  # row 0 is the zero pad
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.clone())
        h = model.model.norm(model.model(torch.tensor([[5, 6, 7]])).last_hidden_state[0, -1])
        a, b = (tok(x, add_special_tokens=False).input_ids[0] for x in (" A", " B"))
        model.lm_head.weight[a] = model.lm_head.weight[b] + 3.0 * h / h.dot(h)
    judge_dir = tmp_path / "judge"
    model.save_pretrained(judge_dir)
    tok.save_pretrained(judge_dir)

    judge = ["reward.source=judge", f"reward.model_path={judge_dir}", "reward.judge.answers=[' A', ' B']"]
    rating = config(tmp_path, tiny_model_dir, "data.num_examples=3", "generate.sampling.max_new_tokens=6", *judge,
                    "reward.judge.template=Start: {prompt} End: {completion} Good?", "label.pairs=scored",
                    f"label.output_dir={tmp_path / 'rating'}")
    rated = pq.read_table(Path(label.run(rating, quiet())).parent / "scores.parquet").to_pydict()["score"]
    assert rated == pytest.approx([1 / (1 + math.exp(-3))] * 12, abs=1e-4)  # sigmoid(3): its taste for " A"

    pairwise = config(tmp_path, tiny_model_dir, "data.num_examples=3", "generate.sampling.max_new_tokens=6", *judge,
                      "reward.judge.mode=pairwise", "reward.judge.template=Start: {prompt} A: {a} B: {b} Which?",
                      "label.pairs=scored", f"label.output_dir={tmp_path / 'pairwise'}")
    scored = pq.read_table(Path(label.run(pairwise, quiet())).parent / "scores.parquet").to_pydict()["score"]
    assert scored == pytest.approx([0.5] * 12, abs=1e-6)

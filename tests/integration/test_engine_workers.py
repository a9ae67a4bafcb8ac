"""The engine worker and worker group under every role: generation on ZeRO-3 ranks equals plain
transformers, sampled log-probs equal a separate forward, a scalar-head role needs no new worker."""

from pathlib import Path

import pytest
import torch

from prefopt.cluster.engine_worker import EngineWorker
from prefopt.cluster.worker_group import ClusterError, WorkerGroup, as_completed
from prefopt.config import load_config
from prefopt.workers.policy import PolicyWorker

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["The movie was", "I did not expect", "Honestly, the acting", "A film about", "What a", "This is the"]


def two_rank_config(model_dir, tmp_path):
    return load_config(ROOT / "configs/tiny/dpo.yaml", [
        f"model.path={model_dir}", f"output_dir={tmp_path}", "policy.num_workers=2", "policy.micro_batch_size=2",
        "policy.deepspeed.zero_stage=3"])


def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(p).input_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def policy(tiny_model_dir, tmp_path_factory, ray_local):
    """A policy group of 2 ZeRO-3 ranks, built (no data: generation and scoring only), exported."""
    out = tmp_path_factory.mktemp("policy")
    cfg = two_rank_config(tiny_model_dir, out)
    group = WorkerGroup(PolicyWorker, cfg.policy, cfg.cluster, name="policy", key="policy",
                        init_args=(cfg.model_dump_json(),))
    infos = group.call("setup", str(tiny_model_dir))
    assert [i["zero_stage"] for i in infos] == [3, 3]
    group.call("export", str(out / "model"))
    yield group, out / "model"
    group.shutdown()


def test_greedy_generation_on_two_zero3_ranks_equals_transformers(policy, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    group, exported = policy
    greedy = {"max_new_tokens": 12, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "greedy": True}
    samples = group.split("generate", prompt_ids(tiny_tokenizer), greedy, 0)  # 3 prompts per rank
    model = AutoModelForCausalLM.from_pretrained(exported).eval()
    for ids, sample in zip(prompt_ids(tiny_tokenizer), samples, strict=True):
        expected = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                  pad_token_id=tiny_tokenizer.pad_token_id)[0, len(ids):].tolist()
        if tiny_tokenizer.eos_token_id in expected:
            expected = expected[: expected.index(tiny_tokenizer.eos_token_id) + 1]
        assert sample["completion_ids"] == expected
        assert sample["text"] == tiny_tokenizer.decode(expected, skip_special_tokens=True)


def test_sampled_logprobs_equal_a_separate_forward(policy, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    group, exported = policy
    sampling = {"max_new_tokens": 10, "temperature": 0.8, "top_k": 50, "top_p": 0.95, "greedy": False}
    prompts = prompt_ids(tiny_tokenizer)
    samples = group.split("generate", prompts, sampling, 7)
    assert samples == group.split("generate", prompts, sampling, 7)  # the seed decides the samples
    assert samples != group.split("generate", prompts, sampling, 8)
    model = AutoModelForCausalLM.from_pretrained(exported).eval()
    for ids, sample in zip(prompts, samples, strict=True):
        sequence = torch.tensor([ids + sample["completion_ids"]])
        with torch.no_grad():
            logps = torch.log_softmax(model(sequence).logits[0].double(), -1)  # temperature 1: the model's own
        expected = logps[len(ids) - 1 : -1].gather(1, sequence[0, len(ids):, None])[:, 0]
        assert sample["logprobs"] == pytest.approx(expected.tolist(), abs=1e-5)
    # Scoring the same completions on the ranks gives the same numbers (the KL's two halves agree).
    scored = group.split("score", [{"prompt_ids": p, "completion_ids": s["completion_ids"]}
                                   for p, s in zip(prompts, samples, strict=True)])
    for sample, values in zip(samples, scored, strict=True):
        assert values == pytest.approx(sample["logprobs"], abs=1e-5)


def test_split_keeps_item_order_with_uneven_chunks(policy, tiny_tokenizer):
    group, _ = policy
    greedy = {"max_new_tokens": 3, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "greedy": True}
    ids = prompt_ids(tiny_tokenizer)
    every = group.split("generate", ids, greedy, 0)
    five = group.split("generate", ids[:5], greedy, 0)  # 3 + 2, the second rank padded with a repeat
    assert [s["completion_ids"] for s in five] == [s["completion_ids"] for s in every[:5]]
    assert group.split("generate", [], greedy, 0) == []


def test_split_async_gives_the_same_results_as_split_as_each_call_completes(policy, tiny_tokenizer):
    group, _ = policy
    greedy = {"max_new_tokens": 3, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "greedy": True}
    ids = prompt_ids(tiny_tokenizer)
    five = group.split("generate", ids[:5], greedy, 0)
    # Two calls in flight at once (queued on the same ranks here), one of them with no items.
    calls = {"five": group.split_async("generate", ids[:5], greedy, 0),
             "none": group.split_async("generate", [], greedy, 0)}
    got = dict(as_completed(calls))
    assert got == {"five": five, "none": []}
    assert group.split_async("generate", ids[:5], greedy, 0).wait() == five


def test_a_scalar_head_role_runs_on_the_same_engine_worker(tiny_model_dir, tiny_tokenizer, tmp_path, ray_local):
    """A critic or reward model is the engine worker with head="scalar": per-token values on 2
    ZeRO-3 ranks equal plain transformers on its export (...ForSequenceClassification)."""
    from transformers import AutoModelForSequenceClassification

    cfg = two_rank_config(tiny_model_dir, tmp_path)
    group = WorkerGroup(EngineWorker, cfg.policy, cfg.cluster, name="critic", key="policy",
                        init_args=(cfg.model_dump_json(),))
    try:
        assert [i["zero_stage"] for i in group.call("build", str(tiny_model_dir), train=False, head="scalar")] == [3, 3]
        group.call("export", str(tmp_path / "critic"))
        completions = [tiny_tokenizer(" great fun", add_special_tokens=False).input_ids, [5, 6, 7, 8]]
        samples = [{"prompt_ids": p, "completion_ids": c} for p in prompt_ids(tiny_tokenizer)[:2] for c in completions]
        values = group.split("score", samples)
    finally:
        group.shutdown()
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "critic", num_labels=1).eval()
    for sample, got in zip(samples, values, strict=True):
        ids = torch.tensor([sample["prompt_ids"] + sample["completion_ids"]])
        with torch.no_grad():
            per_token = model.score(model.base_model(input_ids=ids).last_hidden_state)[0, :, 0]  # [T]
        p = len(sample["prompt_ids"])
        assert got == pytest.approx(per_token[p - 1 : -1].tolist(), abs=1e-5)  # the state before each token


def test_a_request_no_node_can_hold_fails_at_once(tiny_model_dir, tmp_path, ray_local):
    cfg = two_rank_config(tiny_model_dir, tmp_path)
    gpu = cfg.policy.model_copy(update={"gpus_per_worker": 1})
    with pytest.raises(ClusterError, match=r"policy.gpus_per_worker=1 but no node of the cluster has a GPU"):
        WorkerGroup(EngineWorker, gpu, cfg.cluster, name="policy", key="policy", init_args=(cfg.model_dump_json(),))
    huge = cfg.policy.model_copy(update={"cpus_per_worker": 4096})
    with pytest.raises(ClusterError, match=r"policy.cpus_per_worker=4096 but the largest node has"):
        WorkerGroup(EngineWorker, huge, cfg.cluster, name="policy", key="policy", init_args=(cfg.model_dump_json(),))

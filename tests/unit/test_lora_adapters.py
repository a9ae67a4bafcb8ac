"""LoRA through peft on one process (no DeepSpeed): what trains, the adapters switched off, the
adapter directory and the merged model, and the config's rules."""

import pytest
import torch

from prefopt.config import ConfigError, LoraConfig, load_config
from prefopt.models.lora import adapters_off, add_adapters, fully_trained, merge_adapter, save_adapter

IDS = torch.tensor([[5, 17, 99, 3, 240, 61, 7, 300]])


def tiny(model_dir, head="lm"):
    from prefopt.cluster.engine_worker import load_model

    return load_model(str(model_dir), head, torch.float32)


def nudge_adapters(model) -> None:
    """LoRA's B starts at zero (the adapted model is the base): move it so that there is a difference."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def logits(model, ids=IDS):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_only_adapters_train_and_switching_them_off_gives_the_base_model(tiny_model_dir):
    base_logits = logits(tiny(tiny_model_dir))
    model = add_adapters(tiny(tiny_model_dir), LoraConfig(rank=4), "lm")
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained), trained
    # Every linear layer of every decoder block has its adapter; embeddings and the output layer have none.
    layers = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trained}
    assert layers == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert torch.equal(logits(model), base_logits)  # B = 0 at the start: the policy is its reference
    nudge_adapters(model)
    assert not torch.allclose(logits(model), base_logits, atol=1e-4)
    with adapters_off(model):
        assert torch.allclose(logits(model), base_logits, atol=1e-6)
    assert not torch.allclose(logits(model), base_logits, atol=1e-4)  # and back on after


def test_adapter_directory_loads_with_peft_and_the_merged_model_with_plain_transformers(tiny_model_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    model = add_adapters(tiny(tiny_model_dir), LoraConfig(rank=4, alpha=8), "lm")
    nudge_adapters(model)
    expected = logits(model)
    save_adapter(model, model.state_dict(), tmp_path / "adapter", fully_trained(LoraConfig(), "lm"))
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files and "config.json" not in files
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert torch.allclose(logits(loaded), expected, atol=1e-5)
    merge_adapter(tiny(tiny_model_dir), tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.allclose(logits(merged), expected, atol=1e-5)


def test_a_scalar_head_trains_in_full_and_travels_with_the_adapter(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    lora = LoraConfig(rank=4)
    model = add_adapters(tiny(tiny_model_dir, "scalar"), lora, "scalar")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.score.weight" in trained
    nudge_adapters(model)
    with torch.no_grad():
        model.get_base_model().score.weight.normal_(0, 0.1)
    expected = logits(model)
    save_adapter(model, model.state_dict(), tmp_path / "adapter", fully_trained(lora, "scalar"))
    merge_adapter(tiny(tiny_model_dir, "scalar"), tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", num_labels=1)
    assert torch.allclose(logits(merged), expected, atol=1e-5)


def test_lora_settings_are_checked_at_load(tmp_path):
    dpo = "configs/tiny/dpo.yaml"
    cfg = load_config(dpo, ["model.lora.rank=4", "ref.mode=adapters_off"])
    assert cfg.model.lora.rank == 4 and cfg.model.lora.alpha == 32
    assert load_config(dpo).model.lora is None
    with pytest.raises(ConfigError, match="set model.lora"):
        load_config(dpo, ["ref.mode=adapters_off"])
    with pytest.raises(ConfigError, match="ref.model_path"):
        load_config(dpo, ["model.lora.rank=4", "ref.mode=adapters_off", f"ref.model_path={tmp_path}"])
    with pytest.raises(ConfigError, match="target_modules"):
        load_config(dpo, ["model.lora.target_modules=[]"])
    with pytest.raises(ConfigError, match="rank"):
        load_config(dpo, ["model.lora.rank=0"])
    with pytest.raises(ConfigError, match="adapters_off"):
        load_config("configs/tiny/rest.yaml", ["model.lora.rank=4", "ref.mode=adapters_off"])


def test_adapters_off_starts_no_reference_role():
    from prefopt.algorithm_spec import spec_for

    for path in ("configs/tiny/dpo.yaml", "configs/tiny/ppo.yaml"):
        full = load_config(path)
        lora = load_config(path, ["model.lora.rank=4", "ref.mode=adapters_off"])
        assert "reference" in [r.name for r in spec_for(full).roles(full)], path
        assert [r.name for r in spec_for(lora).roles(lora)] == ["policy"] + (["critic"] if "ppo" in path else [])


def test_an_adapter_directory_given_as_a_model_says_what_to_use(tiny_model_dir, tmp_path):
    from prefopt.errors import UserError
    from prefopt.models.model_dir import model_config

    model = add_adapters(tiny(tiny_model_dir), LoraConfig(rank=2), "lm")
    save_adapter(model, model.state_dict(), tmp_path / "adapter", [])
    with pytest.raises(UserError, match=r"model.path: .*adapter holds a LoRA adapter.*merge_on_export"):
        model_config(str(tmp_path / "adapter"), "model.path")
    with pytest.raises(UserError, match="no config.json"):
        model_config(str(tmp_path), "model.path")

"""LoRA DPO end to end on two ZeRO-3 CPU ranks: it starts at ln 2 and learns the built-in task,
only the adapters change and only they are checkpointed, the adapter and the merged export give
the trained model's log-probs, a run resumes exactly from an adapter checkpoint, one reference
cache serves full and LoRA runs, and the reference as the adapters switched off on the policy's
own ranks is the same reference as the cached base model."""

import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console

from prefopt.algorithms.offline import train
from prefopt.config import load_config

ROOT = Path(__file__).resolve().parents[2]
TINY_DPO_LORA = ROOT / "configs/tiny/dpo_lora.yaml"
LORA_STEPS = 40


def read_metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def recording() -> Console:
    return Console(file=io.StringIO(), width=200)


def lora_config(out, model_dir, *overrides):
    return load_config(TINY_DPO_LORA, [f"model.path={model_dir}", f"output_dir={out}", "eval.every_steps=null",
                                       "eval.num_prompts=8", "eval.sampling.max_new_tokens=8", *overrides])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, ray_local):
    """LoRA DPO on the built-in task, 2 ZeRO-3 ranks, a checkpoint half-way, the merged model exported."""
    out = tmp_path_factory.mktemp("lora") / "run"
    cfg = lora_config(out, tiny_model_dir, "policy.num_workers=2", f"train.max_steps={LORA_STEPS}",
                      f"train.save_steps={LORA_STEPS // 2}", "train.lr=5e-3", "policy.micro_batch_size=8",
                      f"ref.cache_dir={out.parent / 'refcache'}")
    console = recording()
    result = train(cfg, console)
    return cfg, result, out, console.file.getvalue()


def test_lora_dpo_starts_at_ln2_and_learns_the_task_on_two_zero3_ranks(lora_run):
    _, result, out, log = lora_run
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, LORA_STEPS + 1))
    assert "2 rank(s), ZeRO stage 3" in log
    # B = 0 at the start: the adapted policy is its base model, the reference (docs/losses.md, "Invariant").
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    late = metrics[-20:]
    accuracy = sum(m["rewards/accuracies"] for m in late) / len(late)
    loss = sum(m["loss"] for m in late) / len(late)
    print(f"LoRA DPO, steps {LORA_STEPS - 19}-{LORA_STEPS}: reward accuracy {accuracy:.2f}, loss {loss:.3f}")
    assert accuracy > 0.58 and metrics[0]["rewards/accuracies"] == 0.0
    assert loss < math.log(2) - 0.01
    assert result.final_metrics["eval/kl"] != pytest.approx(0.0, abs=1e-4)  # the policy moved away


def test_only_adapters_change_and_only_they_are_checkpointed(lora_run, tiny_model_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg, _, out, _ = lora_run
    # The checkpoint: adapters and their optimizer state, no base weight.
    for states in (out / f"checkpoints/step{LORA_STEPS}").glob("*model_states.pt"):
        saved = torch.load(states, weights_only=False)
        names = [n for shapes in saved["param_shapes"] for n in shapes] + list(saved["module"])
        assert names and all(".lora_A." in n or ".lora_B." in n for n in names), names[:5]
    # Every base weight before and after: the merged export less the adapters' update is the
    # starting model, to rounding; what has no adapter is the starting model exactly.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    adapter = load_file(out / "adapter/adapter_model.safetensors")
    scale = cfg.model.lora.alpha / cfg.model.lora.rank
    adapted = 0
    for name, before in base.items():
        a_key = f"base_model.model.{name.removesuffix('.weight')}.lora_A.weight"
        if a_key in adapter:
            update = scale * adapter[a_key.replace("lora_A", "lora_B")] @ adapter[a_key]
            assert update.abs().max() > 1e-4, name  # the adapter trained
            assert torch.allclose(merged[name] - update, before, atol=1e-6), name
            adapted += 1
        else:
            assert torch.equal(merged[name], before), name
    assert adapted == 7 * cfg.model.tiny.num_hidden_layers


def test_merged_export_gives_the_adapter_models_log_probs(lora_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, out, _ = lora_run
    tok = AutoTokenizer.from_pretrained(out / "adapter")
    ids = tok(["This movie was a delight from start to end", "I did not like the plot at all"],
              return_tensors="pt", padding=True)
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)

    def logps(model):
        model.eval()
        with torch.no_grad():
            return torch.log_softmax(model(**ids).logits.float(), -1)

    assert torch.allclose(logps(merged), logps(adapter), atol=1e-5)
    assert not torch.allclose(logps(merged), logps(base), atol=1e-3)  # the comparison can fail


def test_one_reference_cache_serves_full_and_lora_runs(lora_run, tiny_model_dir, tmp_path):
    _, _, out, log = lora_run
    assert "reference cache miss" in log  # the LoRA run filled it, from the base model
    full = load_config(ROOT / "configs/tiny/dpo.yaml", [
        f"model.path={tiny_model_dir}", f"output_dir={tmp_path / 'full'}", "train.max_steps=1",
        "policy.micro_batch_size=8", "eval.every_steps=null", "eval.num_prompts=8", "eval.sampling.max_new_tokens=8",
        f"ref.cache_dir={out.parent / 'refcache'}"])
    console = recording()
    train(full, console)
    assert "reference cache hit" in console.file.getvalue()


def test_killed_lora_run_resumes_from_its_adapter_checkpoint_to_the_same_final_loss(lora_run, tiny_model_dir):
    cfg, _, out, _ = lora_run
    straight = read_metrics(out)
    # The state of a run killed after its checkpoint at step 20: the later checkpoint and steps gone.
    shutil.rmtree(out / f"checkpoints/step{LORA_STEPS}")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(lines[: LORA_STEPS // 2]) + "\n")
    console = recording()
    train(cfg, console)
    assert f"at step {LORA_STEPS // 2}" in console.file.getvalue()
    resumed = read_metrics(out)
    assert [m["step"] for m in resumed] == list(range(1, LORA_STEPS + 1))
    assert resumed[-1]["loss"] == pytest.approx(straight[-1]["loss"], abs=1e-5)
    assert resumed[-1]["loss"] != pytest.approx(straight[LORA_STEPS // 2 - 1]["loss"], abs=1e-4)


def test_adapters_off_on_the_policy_ranks_is_the_cached_base_model(tmp_path, tiny_model_dir, ray_local):
    """ref.mode adapters_off (no reference role, no second copy) trains exactly as the cache of the
    base model does on two ZeRO-3 ranks: both references are the same model."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Review {i}:", "chosen": " a wonderful, moving film.",
                                         "rejected": " a dull and tiresome mess."}) + "\n" for i in range(32)))
    curves = {}
    for mode in ("cache", "adapters_off"):
        cfg = lora_config(tmp_path / mode, tiny_model_dir, f"ref.mode={mode}", "data.task=null",
                          f"data.path={pairs}", "train.max_steps=4", "train.save_steps=100",
                          "model.lora.merge_on_export=false", "policy.num_workers=2")
        result = train(cfg, recording())
        curves[mode] = [m["loss"] for m in read_metrics(tmp_path / mode)]
        if mode == "adapters_off":
            assert "reference_startup_seconds" not in result.timings  # no reference ranks were started
            assert Path(result.model_dir).name == "adapter"
    assert curves["cache"][0] == pytest.approx(math.log(2), abs=1e-5)
    assert curves["cache"][-1] != pytest.approx(math.log(2), abs=1e-4)
    assert curves["adapters_off"] == pytest.approx(curves["cache"], abs=1e-5)


def test_lora_under_zero2_saves_adapters_only_and_resumes_exactly(tmp_path, tiny_model_dir, ray_local):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Review {i}:", "chosen": " a wonderful, moving film.",
                                         "rejected": " a dull and tiresome mess."}) + "\n" for i in range(32)))
    out = tmp_path / "run"
    cfg = lora_config(out, tiny_model_dir, "data.task=null", f"data.path={pairs}", "train.max_steps=6",
                      "train.save_steps=3", "policy.num_workers=2", "policy.deepspeed.zero_stage=2",
                      "model.lora.merge_on_export=false")
    console = recording()
    train(cfg, console)
    assert "ZeRO stage 2" in console.file.getvalue()
    straight = read_metrics(out)
    for states in (out / "checkpoints/step6").glob("*model_states.pt"):
        module = torch.load(states, weights_only=False)["module"]
        assert module and all(".lora_A." in n or ".lora_B." in n for n in module), list(module)[:5]
    shutil.rmtree(out / "checkpoints/step6")
    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in
                                               (out / "metrics.jsonl").read_text().splitlines()[:3]))
    train(cfg, recording())
    assert read_metrics(out)[-1]["loss"] == pytest.approx(straight[-1]["loss"], abs=1e-5)
    assert straight[-1]["loss"] != pytest.approx(straight[2]["loss"], abs=1e-4)

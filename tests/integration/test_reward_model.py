"""Reward-model training on the engine workers: it learns the built-in task's preference, and
its export is a plain transformers ...ForSequenceClassification giving the same rewards."""

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from prefopt.algorithms import train
from prefopt.config import load_config

ROOT = Path(__file__).resolve().parents[2]
TINY_RM = ROOT / "configs/tiny/reward_model.yaml"


def export_accuracy(model_dir, run_dir) -> float:
    """The exported reward model's accuracy on the run's held-out pairs, one sequence at a time."""
    from transformers import AutoModelForSequenceClassification

    from prefopt.data import TokenizedData

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    heldout = TokenizedData.open(next((Path(run_dir) / "heldout").glob("tokenized-*")))
    wins = 0
    for row in heldout.rows(range(heldout.num_rows)):
        with torch.no_grad():
            chosen, rejected = (model(torch.tensor([row["prompt_ids"] + row[f"{side}_ids"]])).logits.item()
                                for side in ("chosen", "rejected"))
        wins += chosen > rejected
    return wins / heldout.num_rows


def test_reward_model_learns_the_task_and_exports_for_transformers(tmp_path, tiny_model_dir, ray_local):
    from mlflow import MlflowClient


    cfg = load_config(TINY_RM, [f"model.path={tiny_model_dir}", f"output_dir={tmp_path / 'run'}",
                                "train.max_steps=120", "eval.every_steps=60", "eval.num_prompts=128"])
    result = train(cfg, Console(file=io.StringIO()))
    history = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(result.run_id, "eval/rm_accuracy")
    accuracy = {m.step: m.value for m in history}
    assert sorted(accuracy) == [0, 60, 120]
    assert accuracy[120] >= 0.85 > accuracy[0]  # from chance to the preference (0.94 here, 2026-11-25)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"] and {"rm/accuracy", "rm/margin"} <= metrics[-1].keys()

    # The export scores the held-out pairs, one sequence at a time, exactly as the run measured.
    assert export_accuracy(result.model_dir, tmp_path / "run") == pytest.approx(accuracy[120])


def test_reward_model_on_two_zero3_ranks(tmp_path, tiny_model_dir, ray_local):
    cfg = load_config(TINY_RM, [f"model.path={tiny_model_dir}", f"output_dir={tmp_path / 'run'}", "train.max_steps=3",
                                "policy.num_workers=2", "policy.micro_batch_size=4", "eval.num_prompts=16",
                                "data.num_examples=64"])
    result = train(cfg, Console(file=io.StringIO()))
    # Each rank holds half of the parameters; the export gathers them into one plain model.
    assert len(result.param_bytes) == 2 and result.param_bytes[0] == result.param_bytes[1]
    config = json.loads((Path(result.model_dir) / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1


def test_lora_reward_model_on_two_zero3_ranks_exports_merged_with_its_head(tmp_path, tiny_model_dir, ray_local):
    """LoRA adapters on the body, the new scalar head trained in full (in place, under ZeRO-3): the
    export is merged, so reward.model_path can read it, and it scores the held-out pairs exactly
    as the run measured them."""
    from mlflow import MlflowClient

    from prefopt.models.model_dir import check_reward_model

    steps = 60
    cfg = load_config(TINY_RM, [f"model.path={tiny_model_dir}", f"output_dir={tmp_path / 'run'}",
                                f"train.max_steps={steps}", "policy.num_workers=2", "eval.every_steps=null",
                                "eval.num_prompts=64", "model.lora.rank=8", "train.lr=3e-3"])
    result = train(cfg, Console(file=io.StringIO()))
    assert Path(result.model_dir) == tmp_path / "run" / "model"
    check_reward_model(result.model_dir)
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert result.memory[0]["trainable_param_bytes"] < 0.5 * result.memory[0]["param_bytes"]
    history = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(result.run_id, "eval/rm_accuracy")
    accuracy = {m.step: m.value for m in history}
    print(f"LoRA reward model, {steps} steps: held-out accuracy {accuracy[0]:.2f} -> {accuracy[steps]:.2f}")
    assert accuracy[steps] >= accuracy[0] + 0.1
    assert export_accuracy(result.model_dir, tmp_path / "run") == pytest.approx(accuracy[steps])

"""`prefopt demo` end to end, shortened: two methods trained, evaluated, compared."""

import csv
import io
import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from prefopt.cli import DEMO_CONFIG
from prefopt.config import load_config
from prefopt.demo import DEMO_RUNS, run_demo


def test_demo_trains_each_method_and_writes_the_comparison(tmp_path, tiny_model_dir, ray_local):
    cfg = load_config(DEMO_CONFIG, [f"model.path={tiny_model_dir}", "data.num_examples=48", "train.max_steps=2",
                                    "policy.micro_batch_size=4", "eval.num_prompts=4", "eval.sampling.max_new_tokens=4",
                                    f"output_dir={tmp_path / 'demo'}"])
    out = io.StringIO()
    run_demo(cfg, Console(file=out, width=200))
    for method in ["sft", *DEMO_RUNS]:
        assert (tmp_path / "demo" / method / "model" / "config.json").is_file(), method
    # Every compared method started from the SFT model, which is their reference.
    for method in DEMO_RUNS:
        cfg_text = (tmp_path / "demo" / method / "config.yaml").read_text()
        assert str(tmp_path / "demo" / "sft" / "model") in cfg_text
    compare = tmp_path / "demo" / "compare"
    png = (compare / "frontier.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    with (compare / "comparison.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(DEMO_RUNS)
    # PPO-GT is named for its reward (the task's truth), as the DPO paper names it.
    assert sorted(r["method"] for r in rows) == sorted({"ppo": "ppo-gt"}.get(m, m) for m in DEMO_RUNS)
    # Each method's best evaluation with its standard error; the limits drawn from the SFT model's samples.
    assert "± " in (compare / "comparison.md").read_text()
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'demo' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.`eval.limits` = '16'")
    assert len(runs) == 1 and runs[0].info.run_name.startswith("dpo")
    # Each method was evaluated, on the task's reward in [0, 1] and a finite KL to the SFT model.
    for row in rows:
        assert int(row["num_evals"]) >= 1, row
        assert 0.0 <= float(row["best_reward"]) <= 1.0 and math.isfinite(float(row["kl_at_best"])), row
    # DPO starts at its reference (the SFT model): its first loss is ln 2 (docs/losses.md, "Invariant").
    dpo = [json.loads(line) for line in (tmp_path / "demo" / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in dpo] == [1, 2]
    assert dpo[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    # The SFT stage trained every step of its own config, its loss a finite, positive NLL.
    sft_steps = load_config(tmp_path / "demo" / "sft" / "config.yaml").train.max_steps
    sft = [json.loads(line) for line in (tmp_path / "demo" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in sft] == list(range(1, sft_steps + 1))
    assert all(0 < m["loss"] < 50 for m in sft)
    assert "mlflow ui --backend-store-uri sqlite:///" in out.getvalue()
    assert Path(tmp_path / "demo" / "mlflow.db").is_file()

"""`prefopt demo`: the main job on the embedded default, from nothing to a comparison.

Local Ray, an MLflow store in a local SQLite file, the tiny Llama and the built-in IMDb
sentiment task (ground-truth reward known). As in the DPO paper, the reference is an SFT
model: the freshly built tiny Llama is first fine-tuned on the task's chosen completions;
then DPO and SimPO start from it and train on the same pairs, PPO-GT starts from it and
learns from its own samples scored by the task's ground truth, and all three are compared on
reward and KL to it, exactly as a user would do by hand:

    prefopt train <demo.yaml> --set algorithm.name=sft --set tracking.experiment=demo-sft ...
    prefopt train <demo.yaml> --set algorithm.name=dpo --set model.path=runs/demo/sft/model ...
    prefopt train <demo.yaml> --set algorithm.name=simpo --set model.path=runs/demo/sft/model ...
    prefopt train <demo.yaml> --set algorithm.name=ppo --set data.format=prompt_only ...
    prefopt compare --experiment demo
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from prefopt.config import RunConfig, build_config

# The SFT stage that makes the reference (its own experiment: it is not one of the compared methods).
SFT_RUN = {"algorithm": {"name": "sft"}, "ref": {"mode": "none"}, "train": {"lr": 2e-3, "max_steps": 200}}
# method -> overrides applied on top of the demo config; each starts from the SFT model
DEMO_RUNS: dict[str, dict] = {
    # One run draws the limits (best-of-N, the optimum) from the SFT model's samples: compare draws them.
    "dpo": {"algorithm": {"name": "dpo", "beta": 0.1}, "eval": {"limit_samples": 16}},
    "simpo": {"algorithm": {"name": "simpo", "beta": 2.0, "gamma": 1.0}, "ref": {"mode": "none"}},
    # PPO-GT (configs/tiny/ppo.yaml): a step is an iteration of 32 prompts sampled, scored, learned from.
    "ppo": {"algorithm": {"name": "ppo"}, "data": {"format": "prompt_only"}, "critic": {"lr": 1e-3},
            "ppo": {"rollout_prompts": 32, "sampling": {"max_new_tokens": 24}}},
}


def _with(cfg: RunConfig, method: str, overrides: dict) -> RunConfig:
    tree = cfg.model_dump(mode="json")
    tree["algorithm"] = {}
    for section, values in overrides.items():
        tree[section] = {**tree.get(section, {}), **values}
    tree["output_dir"] = str(Path(cfg.output_dir) / method)
    return build_config(tree, source=f"demo run {method}")


def run_demo(cfg: RunConfig, console: Console) -> None:
    from prefopt.algorithms import train
    from prefopt.tracking.cli import compare_cmd
    from prefopt.tracking.store import resolve_tracking_uri, ui_hint

    total = len(DEMO_RUNS) + 1
    sft_cfg = _with(cfg, "sft", {**SFT_RUN, "train": {**cfg.train.model_dump(), **SFT_RUN["train"]},
                                 "tracking": {"experiment": f"{cfg.tracking.experiment}-sft"}})
    console.rule(f"[bold]1/{total}: sft, the reference[/] -> {sft_cfg.output_dir}")
    reference = train(sft_cfg, console).model_dir
    for i, (method, overrides) in enumerate(DEMO_RUNS.items(), start=2):
        run_cfg = _with(cfg, method, {**overrides, "model": {"path": str(reference)}})
        console.rule(f"[bold]{i}/{total}: {method}[/] -> {run_cfg.output_dir}")
        train(run_cfg, console)
    console.rule(f"[bold]comparison of experiment {cfg.tracking.experiment!r}")
    last = _with(cfg, method, {**overrides, "model": {"path": str(reference)}})
    compare_cmd(experiment=cfg.tracking.experiment, tracking_uri=resolve_tracking_uri(last),
                out=Path(cfg.output_dir) / "compare")
    console.print(f"\nbrowse every run: {ui_hint(resolve_tracking_uri(last))}", highlight=False)

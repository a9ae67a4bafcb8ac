"""`prefopt demo`: the main job on the embedded default, from nothing to a comparison.

Local Ray, an MLflow store in a local SQLite file, the tiny Llama and the built-in IMDb
sentiment task (ground-truth reward known). Two methods are trained on the same pairs and
compared on reward and KL to the reference, exactly as a user would do by hand:

    prefopt train <demo.yaml> --set algorithm.name=dpo ...
    prefopt train <demo.yaml> --set algorithm.name=simpo ... --set ref.mode=none
    prefopt compare --experiment demo
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from prefopt.config import RunConfig, build_config

# method -> overrides applied on top of the demo config
DEMO_RUNS: dict[str, dict] = {
    "dpo": {"algorithm": {"name": "dpo", "beta": 0.1}},
    "simpo": {"algorithm": {"name": "simpo", "beta": 2.0, "gamma": 1.0}, "ref": {"mode": "none"}},
}


def _with(cfg: RunConfig, method: str, overrides: dict) -> RunConfig:
    tree = cfg.model_dump(mode="json")
    tree["algorithm"] = {}
    for section, values in overrides.items():
        tree[section] = {**tree.get(section, {}), **values}
    tree["output_dir"] = str(Path(cfg.output_dir) / method)
    return build_config(tree, source=f"demo run {method}")


def run_demo(cfg: RunConfig, console: Console) -> None:
    from prefopt.algorithms.offline import train
    from prefopt.tracking.cli import compare_cmd
    from prefopt.tracking.store import resolve_tracking_uri, ui_hint

    for i, (method, overrides) in enumerate(DEMO_RUNS.items(), start=1):
        run_cfg = _with(cfg, method, overrides)
        console.rule(f"[bold]{i}/{len(DEMO_RUNS)}: {method}[/] -> {run_cfg.output_dir}")
        train(run_cfg, console)
    console.rule(f"[bold]comparison of experiment {cfg.tracking.experiment!r}")
    last = _with(cfg, method, overrides)
    compare_cmd(experiment=cfg.tracking.experiment, tracking_uri=resolve_tracking_uri(last),
                out=Path(cfg.output_dir) / "compare")
    console.print(f"\nbrowse every run: {ui_hint(resolve_tracking_uri(last))}", highlight=False)

"""The `prefopt` command line. Each command exists because it works end to end."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.syntax import Syntax

from prefopt.cli_common import DEBUG, ConfigArg, SetOpt, console, fail, guarded, resolve
from prefopt.config import TinyModelConfig
from prefopt.data.cli import register as register_data
from prefopt.errors import INTERRUPTED
from prefopt.launch.cli import register as register_launch
from prefopt.tracking.cli import register as register_tracking

app = typer.Typer(
    help="prefopt: preference optimisation (DPO, IPO, KTO, SimPO, ORPO, ...) on Ray + DeepSpeed.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect run configs.", no_args_is_help=True)
model_app = typer.Typer(help="Build and inspect models.", no_args_is_help=True)


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks for every error")] = False) -> None:
    """Exit codes: 0 done; 1 bad data rows (data validate); 2 bad config, input or path; 3 the cluster
    cannot hold the request, or a worker failed; 4 a service (tracking) does not answer; 5 training
    stopped by the health guard; 6 some trials of a sweep failed; 70 a bug (traceback in <output_dir>/prefopt-error.log); 130 interrupted."""
    DEBUG["on"] = DEBUG["on"] or debug


app.add_typer(config_app, name="config")
app.add_typer(model_app, name="model")


@config_app.command("show")
def config_show(config: ConfigArg, set_: SetOpt = None) -> None:
    """Print the resolved config (file + overrides + defaults) as YAML."""
    cfg = resolve(config, set_)
    if sys.stdout.isatty():
        console.print(Syntax(cfg.to_yaml(), "yaml", theme="ansi_dark", background_color="default"))
    else:
        sys.stdout.write(cfg.to_yaml())


@model_app.command("build-tiny")
def model_build_tiny(
    out_dir: Annotated[Path, typer.Argument(help="where to save model and tokenizer")],
    config: Annotated[Path | None, typer.Option(help="take model.tiny from this run config")] = None,
    set_: SetOpt = None,
) -> None:
    """Build the tiny Llama + locally trained tokenizer and save them in Hugging Face format."""
    from prefopt.models import save_tiny

    tiny: TinyModelConfig = resolve(config, set_).model.tiny

    def build() -> Path:
        with console.status("training tokenizer and building model"):
            return save_tiny(out_dir, tiny)

    path = guarded(build, log_dir=out_dir)
    console.print(f"saved tiny model to [bold]{path}[/] (load with AutoModelForCausalLM.from_pretrained)")


@app.command()
def demo(
    config: Annotated[Path | None, typer.Argument(help="run config (default: the embedded one)")] = None,
    set_: SetOpt = None,
) -> None:
    """Run the main job on the embedded default: local everything, tiny model, built-in task."""
    from prefopt.demo import run_demo

    cfg = resolve(config or DEMO_CONFIG, set_)
    guarded(lambda: run_demo(cfg, console), config=cfg)


DEMO_CONFIG = Path(__file__).parent / "demo.yaml"


@app.command()
def train(
    config: ConfigArg,
    set_: SetOpt = None,
    resume: Annotated[
        bool | None,
        typer.Option("--resume/--fresh", help="continue from the latest checkpoint / start over "
                     "(default: resume when output_dir holds a checkpoint)", show_default=False),
    ] = None,
) -> None:
    """Train a policy with an offline algorithm (DPO family, KTO, SFT), or a reward model, on Ray + DeepSpeed."""
    from prefopt.algorithms import train as train_any

    cfg = resolve(config, set_)
    guarded(lambda: train_any(cfg, console, resume=resume), config=cfg)


@app.command("precompute-ref")
def precompute_ref(config: ConfigArg, set_: SetOpt = None) -> None:
    """Compute the reference log-probs of the run's data once into the reusable cache (resumable)."""
    from prefopt.algorithms.precompute_ref import run

    cfg = resolve(config, set_)
    guarded(lambda: run(cfg, console), config=cfg)


@app.command()
def generate(config: ConfigArg, set_: SetOpt = None) -> None:
    """Sample generate.num_samples completions per prompt of the data from model.path (resumable shards)."""
    from prefopt.algorithms.generate import run

    cfg = resolve(config, set_)
    guarded(lambda: run(cfg, console), config=cfg)


@app.command()
def label(config: ConfigArg, set_: SetOpt = None) -> None:
    """Score the generated completions with the reward role and write preference pairs for `prefopt train`."""
    from prefopt.algorithms.label import run

    cfg = resolve(config, set_)
    guarded(lambda: run(cfg, console), config=cfg)


@app.command()
def sweep(
    config: Annotated[Path, typer.Argument(help="a sweep file (configs/sweeps/*.yaml) or a run config",
                                           show_default=False)],
    grid: Annotated[list[str] | None, typer.Option("--grid", help="an axis: --grid algorithm.beta=0.05,0.1 "
                                                   "(repeatable; axes multiply)", show_default=False)] = None,
    seeds: Annotated[int | None, typer.Option("--seeds", min=1, help="seeds 0..N-1 per point "
                                              "[default: the sweep file's, else 1]", show_default=False)] = None,
    max_concurrent: Annotated[int | None, typer.Option("--max-concurrent", min=1, help="trials at once "
                                                       "[default: as many as the cluster holds]",
                                                       show_default=False)] = None,
    output_dir: Annotated[str | None, typer.Option("--output-dir", help="where the trials' folders go "
                                                   "[default: the sweep file's, else runs/sweeps/<name>]",
                                                   show_default=False)] = None,
    set_: SetOpt = None,
) -> None:
    """Run one trial per grid point and seed on Ray Tune, under one MLflow parent run; started
    again, it skips finished trials and resumes interrupted ones (docs/sweeps.md)."""
    from prefopt.sweep.spec import load_sweep

    def run() -> None:
        from prefopt.sweep.report import print_summary
        from prefopt.sweep.runner import SweepFailed, run_sweep

        spec = load_sweep(config, grids=grid or [], seeds=seeds, sets=set_ or [], max_concurrent=max_concurrent,
                          output_dir=output_dir)
        result = run_sweep(spec, console)
        print_summary(spec, result, console)
        if result.interrupted:
            fail(f"interrupted: {len(result.interrupted)} trial(s) did not end; the same command resumes them "
                 "from their checkpoints", INTERRUPTED)
        if result.failed:
            raise SweepFailed(f"{len(result.failed)} of {len(result.trials)} trials failed (named above); "
                              f"fix them and run the same command again: finished trials are skipped")

    guarded(run, log_dir=".")


def _run_tokenizer(cfg):
    """The tokenizer of the run's model (built, for a tiny model, under its output_dir)."""
    from prefopt.models import model_and_tokenizer
    from prefopt.storage import local_dir_for

    return model_and_tokenizer(cfg.model, local_dir_for(cfg.output_dir))[1]


# Sub-commands that live beside their packages, registered last so that `prefopt --help` lists them last.
register_data(app, load_tokenizer=_run_tokenizer)
register_tracking(app)
register_launch(app)

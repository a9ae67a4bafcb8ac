"""One sweep trial, as Ray Tune runs it: a whole training run in the trial's own bundles.

Tune starts `run_trial` in a trial actor that holds no CPU of its own (the empty head bundle of
`resources`), once every bundle of the trial's placement group is free: the ranks of the
trial's roles then take those bundles (prefopt.cluster.worker_group.in_trial_bundles), so a
trial never waits for another's resources, it waits in Tune's queue instead.

The run is the same `prefopt train` would do, on the trial's own output_dir: it resumes from
its own checkpoints when the sweep is started again. When it ends, finished or failed, it writes
`sweep-trial.json` there (prefopt.sweep.spec.TRIAL_STATUS), which the runner reads to skip
finished trials and to name failed ones in one line.
"""

from __future__ import annotations

import json
import time
import traceback

from prefopt.sweep.spec import TRIAL_STATUS, Trial

REPORT_EVERY_S = 1.0  # a report waits for the driver to take it: not on every step of a fast run


class TrialFailed(Exception):
    """A trial's run ended in an error; the message is its one line."""


def resources(params: dict):
    """The trial's placement group: an empty head bundle (the controller computes nothing of
    note), then one bundle per rank of every role (prefopt.algorithm_spec.trial_bundles)."""
    from ray.tune import PlacementGroupFactory

    from prefopt.algorithm_spec import trial_bundles

    bundles, _ = trial_bundles(Trial.from_json(params["trial"]).config)
    return PlacementGroupFactory([{}] + bundles, strategy=params.get("strategy", "PACK"))


def run_trial(params: dict) -> None:
    """Tune's function trainable for one trial (params["trial"]: Trial.to_json())."""
    from ray import tune
    from ray.util import get_current_placement_group
    from rich.console import Console

    from prefopt.algorithm_spec import trial_bundles
    from prefopt.algorithms import train
    from prefopt.cluster.worker_group import in_trial_bundles
    from prefopt.storage import Store, local_dir_for
    from prefopt.tracking import tracker

    trial = Trial.from_json(params["trial"])
    cfg = trial.config
    status = Store.at(cfg.output_dir) / TRIAL_STATUS
    log_path = local_dir_for(cfg.output_dir) / "console.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    _, slots = trial_bundles(cfg)
    t0 = time.perf_counter()
    last = {"at": 0.0}

    def report(step: int, metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        if now - last["at"] >= REPORT_EVERY_S or any(k.startswith("eval/") for k in metrics):
            last["at"] = now
            tune.report({"step": step, **{k: v for k, v in metrics.items() if k in SHOWN}})

    with log_path.open("a") as log_file:
        console = Console(file=log_file, width=120, force_terminal=False, force_interactive=False)
        tracker.LISTENERS.append(report)
        try:
            with in_trial_bundles(get_current_placement_group(), slots):
                result = train(cfg, console, resume=None)
        except BaseException as exc:
            line = _one_line(exc, local_dir_for(cfg.output_dir))
            console.print(f"trial failed: {line}")
            status.write_text(json.dumps({"status": "failed", "error": line, "seconds": time.perf_counter() - t0}))
            raise TrialFailed(line) from None
        finally:
            tracker.LISTENERS.remove(report)
    seconds = time.perf_counter() - t0
    final = {k: v for k, v in result.final_metrics.items() if k in SHOWN}
    status.write_text(json.dumps({"status": "finished", "seconds": seconds, "run_id": result.run_id,
                                  "steps": result.steps, "final_metrics": final}))
    tune.report({"step": result.steps, "done_seconds": seconds, **final})


# What a trial passes on to the driver's table (the rest stays in MLflow).
SHOWN = ("loss", "eval/reward", "eval/kl", "eval/win_rate", "ppo/reward", "ppo/kl")


def _one_line(exc: BaseException, log_dir) -> str:
    """A user error's own message; a bug's first line, with its traceback saved beside the run."""
    from prefopt.errors import UserError

    if isinstance(exc, UserError):
        return " ".join(str(exc).split())
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    path = log_dir / "prefopt-error.log"
    path.write_text("".join(traceback.format_exception(exc)))
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"internal error, a bug: {type(exc).__name__}: {first} (traceback in {path})"

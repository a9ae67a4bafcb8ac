"""Sweep scheduling efficiency: how much of a sweep's wall time the trials themselves use.

    .venv/bin/python benchmarks/sweep_efficiency.py                       # 4 β x 2 seeds, 2 ranks per trial
    .venv/bin/python benchmarks/sweep_efficiency.py --ranks 1             # 1 rank each: two at a time on 2 cores
    .venv/bin/python benchmarks/sweep_efficiency.py --values 2 --seeds 1 --steps 2   # a quick look

A sweep of tiny DPO (configs/tiny/dpo.yaml, `--values` values of algorithm.beta x `--seeds`
seeds) run in this process by `prefopt.sweep.runner.run_sweep`, as `prefopt sweep` runs it,
into a temporary directory with its own MLflow SQLite store. Small and fast, as the sweep's
integration tests: 64 pairs, `--steps` optimizer steps, an evaluation on 8 prompts of 8 new
tokens at step 0 and at the end only.

scheduling efficiency = sum of the trials' own seconds (each measured inside its trial, the
"seconds" of its sweep-trial.json) / (the sweep's wall time x the trials the cluster holds at
once). What is missing from 1.0 is time the cluster's slots sat idle around trials:
overhead per trial = (wall x concurrency - sum) / trials.

Where that time goes: the driver's Tune callbacks are timed (a subclass of the runner's
ProgressTable that records when Tune starts, and when each trial's actor has started and
its trial completed), and each trial's own clock is placed on the same wall clock from its
sweep-trial.json (written as it ends: its mtime, minus its seconds, is when the trial's clock
started, after `run_trial`'s imports). Per trial, the gaps are:
- queue -> actor:   the slot was free (the previous trial completed, or Tune started) until
                    Tune reports the trial's actor started; split, from Ray's state API, into
                    the wait for the trial's placement group to be ready (-> pg: Tune stopping
                    the previous trial's actor, removing its group, creating the next) and the
                    start of the trial's actor in it (pg -> actor: a worker process, Tune's
                    trainable set up);
- actor -> own:     the actor started until the trial's own clock starts: Tune's first call
                    into the function trainable, and `run_trial`'s imports (prefopt, torch);
- own end -> done:  the trial's status file written until the driver has the trial completed.
A fresh process's import of prefopt.algorithms is timed on its own, for scale.

The results start with the CPU model and core counts; the JSON printed at the end (and
written with --json) holds the same. Exits 1 if any trial failed or did not end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rich.console import Console  # noqa: E402
from throughput import environment, print_environment  # noqa: E402

from prefopt.sweep import runner  # noqa: E402
from prefopt.sweep.spec import TRIAL_STATUS, load_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_DPO = ROOT / "configs" / "tiny" / "dpo.yaml"
# As tests/integration/test_sweep.py's FAST: 64 pairs, an evaluation on 8 prompts of 8 tokens.
FAST = ["data.num_examples=64", "eval.num_prompts=8", "eval.sampling.max_new_tokens=8", "eval.every_steps=null"]

NAN = float("nan")
EVENTS: dict = {"tune_start": None, "start": {}, "end": {}}  # wall-clock times (time.time()) seen by the driver


class TimedTable(runner.ProgressTable):
    """The runner's progress table, also noting when Tune calls it back (on the driver)."""

    def setup(self, **info):
        EVENTS["tune_start"] = time.time()

    def on_trial_start(self, iteration, trials, trial, **info):
        EVENTS["start"][json.loads(trial.config["trial"])["id"]] = time.time()
        super().on_trial_start(iteration, trials, trial, **info)

    def on_trial_complete(self, iteration, trials, trial, **info):
        EVENTS["end"][json.loads(trial.config["trial"])["id"]] = time.time()
        super().on_trial_complete(iteration, trials, trial, **info)

    def on_trial_error(self, iteration, trials, trial, **info):
        EVENTS["end"][json.loads(trial.config["trial"])["id"]] = time.time()
        super().on_trial_error(iteration, trials, trial, **info)


def import_seconds() -> float:
    """Seconds a fresh Python process takes to import what run_trial imports before its clock starts."""
    code = ("import time; t = time.perf_counter(); import ray.tune; from prefopt.algorithms import train; "
            "from prefopt.cluster.worker_group import in_trial_bundles; print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env=os.environ | {"DS_ACCELERATOR": "cpu"})
    return float(out.stdout.strip().splitlines()[-1])


def placement_groups_ready() -> list[float]:
    """When each placement group of this Ray instance was ready (wall clock, in creation order),
    from Ray's state API; [] where it cannot say."""
    import ray
    from ray.util.state import list_placement_groups

    try:
        groups = list_placement_groups(address=ray.get_runtime_context().gcs_address, detail=True, limit=10_000,
                                       raise_on_missing_output=False)
    except Exception:  # the state API needs the dashboard: without it, no split
        return []
    ready = [(int(g.stats["creation_request_received_ns"]) + 1000 * int(g.stats["end_to_end_creation_latency_us"]))
             / 1e9 for g in groups if g.stats and g.stats.get("end_to_end_creation_latency_us")]
    return sorted(ready)


def timeline(sweep, result, sweep_start: float, pg_ready: list[float]) -> list[dict]:
    """Per trial, in the order its actor started: the driver's and the trial's own times, and the gaps."""
    rows = []
    for trial in sweep.valid_trials():
        status = Path(sweep.output_dir) / trial.id / TRIAL_STATUS
        end = next(e for e in result.trials if e.id == trial.id)
        if trial.id not in EVENTS["start"] or not status.exists():
            continue
        own_end = status.stat().st_mtime
        rows.append({"id": trial.id, "actor": EVENTS["start"][trial.id], "own_start": own_end - end.seconds,
                     "own_end": own_end, "done": EVENTS["end"].get(trial.id, own_end), "seconds": end.seconds})
    rows.sort(key=lambda r: r["actor"])
    # Each trial holds one placement group (its ranks take its bundles): its actor starts in the
    # group that was ready last before it (Tune may stage a group ahead, and drop it unused).
    for r in rows:
        before = [t for t in pg_ready if t <= r["actor"]]
        if before:
            r["pg_ready"] = max(before)
    # With c slots, the k-th trial takes the slot freed by the (k-c)-th trial to complete.
    concurrency = result.concurrency
    freed = sorted(r["done"] for r in rows)
    for k, r in enumerate(rows):
        r["slot_free"] = EVENTS["tune_start"] or sweep_start if k < concurrency else freed[k - concurrency]
        r["queue_to_actor"] = r["actor"] - r["slot_free"]
        if "pg_ready" in r:  # the wait for the placement group, then the actor's start
            r["queue_to_pg"] = r["pg_ready"] - r["slot_free"]
            r["pg_to_actor"] = r["actor"] - r["pg_ready"]
        r["actor_to_own"] = r["own_start"] - r["actor"]
        r["own_to_done"] = r["done"] - r["own_end"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--values", type=int, default=4, help="values of algorithm.beta (grid points)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per grid point")
    parser.add_argument("--ranks", type=int, choices=(1, 2), default=2, help="policy.num_workers of every trial")
    parser.add_argument("--steps", type=int, default=8, help="train.max_steps of every trial")
    parser.add_argument("--max-concurrent", type=int, default=None, help="default: as many as the cluster holds")
    parser.add_argument("--ray-cpus", type=int, default=None,
                        help="start the local Ray with this many logical CPUs (default: as `prefopt sweep` sizes it)")
    parser.add_argument("--keep", action="store_true", help="keep the sweep's directory (its path is printed)")
    parser.add_argument("--json", type=Path, help="also write the JSON results to this file")
    args = parser.parse_args()
    console = Console()
    env = environment(threads=1)
    workdir = Path(tempfile.mkdtemp(prefix="prefopt-sweep-bench-"))
    betas = ",".join(f"{0.05 * 2**i:g}" for i in range(args.values))
    sets = [*FAST, f"train.max_steps={args.steps}", f"policy.num_workers={args.ranks}",
            f"tracking.uri=sqlite:///{workdir}/mlflow.db"]
    sweep = load_sweep(TINY_DPO, grids=[f"algorithm.beta={betas}"], seeds=args.seeds, sets=sets,
                       max_concurrent=args.max_concurrent, output_dir=str(workdir / "sweep"))
    with console.status("timing a fresh process's imports"):
        imports = import_seconds()

    if args.ray_cpus:
        # run_sweep joins a Ray this process has started: one with ray_cpus logical CPUs (connect
        # sizes a local instance at max(cores, the roles' CPUs + 1)).
        from prefopt.cluster.ray_setup import connect
        from prefopt.config import ClusterConfig, RoleConfig

        connect(ClusterConfig(), [RoleConfig(num_workers=args.ray_cpus - 1, cpus_per_worker=1)], log_to_driver=False)
    runner.ProgressTable = TimedTable  # run_sweep builds its callback from the module's name
    start = time.time()
    result = runner.run_sweep(sweep, console)
    outer = time.time() - start
    import ray

    ray_cpus = ray.cluster_resources().get("CPU")
    pg_ready = placement_groups_ready()
    ray.shutdown()

    ran = [t for t in result.trials if t.status != "skipped"]
    total = sum(t.seconds for t in ran)
    overhead = (result.wall_seconds * result.concurrency - total) / max(1, len(ran))
    rows = timeline(sweep, result, start, pg_ready)

    console.print()
    print_environment(console, env)
    console.print(f"Ray: {ray_cpus:g} logical CPUs; up to {result.concurrency} trial(s) at once")
    console.print(f"sweep: {len(sweep.trials)} trials ({args.values} β x {args.seeds} seeds) of tiny DPO, "
                  f"{args.ranks} rank(s) each, {args.steps} steps; in {workdir}", highlight=False, soft_wrap=True)
    for t in result.trials:
        console.print(f"  {t.id}: {t.status}, {t.seconds:.1f} s" + (f" ({t.error})" if t.error else ""),
                      highlight=False)
    console.print(f"wall {result.wall_seconds:.1f} s (run_sweep call {outer:.1f} s); sum of trials' own "
                  f"{total:.1f} s; scheduling efficiency {result.efficiency or NAN:.2f}; overhead per trial "
                  f"{overhead:.1f} s", soft_wrap=True)
    if rows:
        console.print("where the time between trials goes (seconds on the driver's wall clock; ->actor = ->pg + "
                      "pg->actor):", soft_wrap=True)
        console.print(f"  {'trial':18} {'->actor':>7} {'->pg':>6} {'pg->actor':>9} {'actor->own':>10} {'own':>6} "
                      f"{'end->done':>9}")
        for r in rows:
            console.print(f"  {r['id']:18} {r['queue_to_actor']:7.1f} {r.get('queue_to_pg', NAN):6.1f} "
                          f"{r.get('pg_to_actor', NAN):9.1f} {r['actor_to_own']:10.1f} {r['seconds']:6.1f} "
                          f"{r['own_to_done']:9.1f}", highlight=False)
        mean = {k: statistics.mean(r.get(k, NAN) for r in rows)
                for k in ("queue_to_actor", "queue_to_pg", "pg_to_actor", "actor_to_own", "own_to_done")}
        first = EVENTS["tune_start"] - start if EVENTS["tune_start"] else NAN
        console.print(f"  mean: ->actor {mean['queue_to_actor']:.1f} (->pg {mean['queue_to_pg']:.1f}, pg->actor "
                      f"{mean['pg_to_actor']:.1f}), actor->own {mean['actor_to_own']:.1f}, end->done "
                      f"{mean['own_to_done']:.1f}; run_sweep called -> Tune started {first:.1f}; last done -> "
                      f"run_sweep returned {start + outer - max(r['done'] for r in rows):.1f}", soft_wrap=True)
    console.print(f"a fresh process imports ray.tune + prefopt.algorithms in {imports:.1f} s")
    report = {
        "environment": env, "ray_cpus": ray_cpus, "concurrency": result.concurrency, "ranks": args.ranks,
        "steps": args.steps, "trials": [{"id": t.id, "status": t.status, "seconds": t.seconds} for t in result.trials],
        "wall_seconds": result.wall_seconds, "sum_seconds": total, "efficiency": result.efficiency,
        "overhead_per_trial_seconds": overhead, "import_seconds": imports,
        "timeline": [{k: v for k, v in r.items()} for r in rows], "argv": sys.argv[1:],
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if not args.keep:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    if result.failed or result.interrupted:
        sys.exit(1)


if __name__ == "__main__":
    main()

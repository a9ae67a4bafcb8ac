"""`prefopt submit` and `prefopt job status|logs|stop|list`, registered on the main app by `register(app)`.

Ray is imported inside the commands, so that `prefopt --help` stays fast.
"""

from __future__ import annotations

import datetime
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from prefopt.cli_common import err_console, fail, guarded, resolve, set_opt
from prefopt.errors import INTERRUPTED

console = Console(width=None if sys.stdout.isatty() else 160)
job_app = typer.Typer(help="Follow, stop and list jobs on a Ray cluster.", no_args_is_help=True)

AddressOpt = Annotated[
    str | None,
    typer.Option("--address", help="the head's dashboard, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, "
                 "else $RAY_ADDRESS)", show_default=False),
]
JobIdArg = Annotated[str, typer.Argument(help="the job's submission id (prefopt submit prints it)",
                                         show_default=False)]
SetOpt = set_opt("Override a field: --set policy.num_workers=8 (repeatable)")


def _jobs(address: str | None):
    from prefopt.launch.submit import Jobs

    return Jobs(address)


def _warn(line: str) -> None:
    err_console.print(f"[yellow]warning:[/] {line}", highlight=False, soft_wrap=True)


def submit_cmd(
    config: Annotated[Path, typer.Argument(help="YAML run config, or a sweep file (configs/sweeps/*.yaml)",
                                           show_default=False)],
    set_: SetOpt = None,
    grid: Annotated[list[str] | None, typer.Option("--grid", help="submit a sweep: an axis, --grid "
                                                   "algorithm.beta=0.05,0.1 (repeatable; as prefopt sweep)",
                                                   show_default=False)] = None,
    seeds: Annotated[int | None, typer.Option("--seeds", min=1, help="submit a sweep: seeds 0..N-1 per point "
                                              "(as prefopt sweep)", show_default=False)] = None,
    max_concurrent: Annotated[int | None, typer.Option("--max-concurrent", min=1, help="a sweep's trials at once "
                                                       "(as prefopt sweep)", show_default=False)] = None,
    address: AddressOpt = None,
    wait: Annotated[bool, typer.Option("--wait", help="stream the job's logs and exit with its outcome "
                                       "(0 succeeded, 3 failed or stopped)")] = False,
    working_dir: Annotated[
        Path | None,
        typer.Option("--working-dir", help="upload this directory as the job's code (default: the current "
                     "directory when it is a prefopt checkout)", show_default=False, file_okay=False),
    ] = None,
    no_working_dir: Annotated[bool, typer.Option("--no-working-dir", help="upload no code: prefopt is "
                                                 "installed on the cluster (an image, or --pip)")] = False,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", help="also leave out of the upload "
                                                      "(gitignore pattern, repeatable)", show_default=False)] = None,
    pip: Annotated[list[str] | None, typer.Option("--pip", help="pip requirement for the job (repeatable), or "
                                                  "one requirements file", show_default=False)] = None,
    image: Annotated[str | None, typer.Option("--image", help="container image for the job (Ray's "
                                              "runtime_env image_uri)", show_default=False)] = None,
    env: Annotated[list[str] | None, typer.Option("--env", help="NAME=VALUE for the job's environment "
                                                  "(repeatable)", show_default=False)] = None,
) -> None:
    """Submit `prefopt train CONFIG` to a Ray cluster as a job (Ray's Job Submission API); a sweep
    file, or --grid/--seeds, submits the whole `prefopt sweep` as one job."""
    from prefopt.launch.submit import (
        check_resources,
        check_sweep_resources,
        largest_trial,
        plan,
        plan_sweep,
        sweep_args,
    )
    from prefopt.sweep.spec import is_sweep_file, load_sweep

    if working_dir is not None and no_working_dir:
        fail("--working-dir and --no-working-dir: choose one")
    upload = dict(address=address, wait=wait, working_dir=working_dir, no_working_dir=no_working_dir,
                  exclude=exclude, image=image)
    if not (grid or seeds is not None or max_concurrent is not None or is_sweep_file(config)):
        cfg = resolve(config, set_)  # a bad config fails here, before anything is contacted
        guarded(lambda: _submit(lambda package: plan(cfg, config, package=package, pip=pip, image=image, env=env),
                                lambda nodes, url: check_resources(cfg, nodes, url), **upload))
        return

    def submit_sweep() -> None:
        # The sweep is read here, as the job will read it: a bad file, or no valid trial, fails
        # before anything is contacted; the cluster check is that of its largest trial.
        sweep = load_sweep(config, grids=grid or [], seeds=seeds, sets=set_ or [], max_concurrent=max_concurrent)
        largest_trial(sweep)
        args = sweep_args(grid, seeds, set_, max_concurrent)
        _submit(lambda package: plan_sweep(sweep, config, args, package=package, pip=pip, image=image, env=env),
                lambda nodes, url: check_sweep_resources(sweep, nodes, url),
                what=f"sweep {sweep.name}, {len(sweep.trials)} trial(s), ", **upload)

    guarded(submit_sweep)


def _submit(plan_for, check, *, address, wait, working_dir, no_working_dir, exclude, image, what: str = "") -> None:
    """Pack the code, plan the job (plan_for(package)), check it against the cluster's nodes
    (check(nodes, url)), submit it; follow it with --wait."""
    from prefopt.launch.submit import build_package, default_working_dir

    source = None if no_working_dir else working_dir
    if source is None and not no_working_dir:
        source = default_working_dir(Path.cwd())
        if source is not None and image is not None:
            _warn(f"--image: {source} is not uploaded (Ray's image_uri takes only environment variables); the "
                  "image's prefopt runs")
            source = None
    with tempfile.TemporaryDirectory(prefix="prefopt-submit-") as tmp:
        package, code = None, "no code upload"
        if source is not None:
            package = build_package(source, Path(tmp), excludes=tuple(exclude or ()))
            code = f"uploaded {source} ({package.stat().st_size / 2**20:.1f} MiB zipped)"
        submission = plan_for(package)
        jobs = _jobs(address)
        nodes = jobs.nodes()
        if nodes:
            check(nodes, jobs.url)
        else:
            _warn(f"the dashboard at {jobs.url} did not list its nodes: the job checks its resources when it "
                  "connects")
        for note in submission.notes:
            _warn(note)
        job_id = jobs.submit(submission)
    console.print(f"submitted job [bold]{job_id}[/] to {jobs.url} ({what}{code}; Ray {jobs.ray_version})",
                  highlight=False)
    if not wait:
        console.print(f"follow it: prefopt job logs {job_id} --follow --address {jobs.url}", highlight=False)
        return
    _follow(jobs, job_id)


def _follow(jobs, job_id: str) -> None:
    """Stream the logs, then one line and the exit code of the job's outcome."""
    try:
        info = jobs.follow(job_id)
    except KeyboardInterrupt:
        fail(f"stopped following; job {job_id} goes on (prefopt job stop {job_id} --address {jobs.url})",
             INTERRUPTED)
    outcome = jobs.outcome(info)
    if outcome.code:
        fail(outcome.line, outcome.code)
    console.print(outcome.line, highlight=False)


@job_app.command("status")
def job_status(job_id: JobIdArg, address: AddressOpt = None) -> None:
    """Print a job's status and Ray's message about it."""
    def run() -> None:
        jobs = _jobs(address)
        info = jobs.info(job_id)
        message = (info.message or "").strip().splitlines()
        console.print(f"{job_id}  {info.status}  {message[0] if message else ''}".rstrip(), highlight=False)

    guarded(run)


@job_app.command("logs")
def job_logs(
    job_id: JobIdArg,
    address: AddressOpt = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="stream until the job ends, and exit with its "
                                         "outcome (0 succeeded, 3 failed or stopped)")] = False,
) -> None:
    """Print a job's logs (the driver's output: `prefopt train`'s and its workers')."""
    def run() -> None:
        jobs = _jobs(address)
        if follow:
            _follow(jobs, job_id)
        else:
            sys.stdout.write(jobs.logs(job_id))

    guarded(run)


@job_app.command("stop")
def job_stop(
    job_id: JobIdArg,
    address: AddressOpt = None,
    timeout: Annotated[float, typer.Option("--timeout", help="seconds to wait for the job to end")] = 60,
) -> None:
    """Stop a running job (Ray sends its driver SIGTERM, then SIGKILL) and wait until it has ended."""
    def run() -> None:
        jobs = _jobs(address)
        if not jobs.stop(job_id):
            console.print(f"job {job_id} was not running ({jobs.info(job_id).status})", highlight=False)
            return
        info = jobs.wait(job_id, timeout_s=timeout)
        if str(info.status) not in ("STOPPED", "FAILED", "SUCCEEDED"):
            fail(f"job {job_id} is still {info.status} after {timeout:g}s; check again with prefopt job status "
                 f"{job_id} --address {jobs.url}", 3)
        console.print(f"job {job_id} {info.status}", highlight=False)

    guarded(run)


@job_app.command("list")
def job_list(address: AddressOpt = None) -> None:
    """List the cluster's jobs, newest first."""
    def run() -> None:
        jobs = _jobs(address)
        rows = sorted(jobs.list_jobs(), key=lambda j: j.start_time or 0, reverse=True)
        table = Table(title=f"jobs on {jobs.url}", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for head in ("started", "job", "status", "config"):
            table.add_column(head, overflow="fold")
        for job in rows:
            started = (datetime.datetime.fromtimestamp(job.start_time / 1000).strftime("%m-%d %H:%M")
                       if job.start_time else "-")
            what = (job.metadata or {}).get("prefopt.config") or job.entrypoint
            table.add_row(started, job.submission_id or job.job_id or "-", str(job.status), what)
        console.print(table)
        console.print(f"{len(rows)} job(s)", highlight=False)

    guarded(run)


def register(app: typer.Typer) -> None:
    app.command("submit")(submit_cmd)
    app.add_typer(job_app, name="job")


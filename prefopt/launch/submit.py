"""Submit a run to a Ray cluster through Ray's Job Submission API; follow, stop and list jobs.

What a submitted job gets (docs/cluster.md):

- the resolved config, validated here first, as base64 YAML in the job's environment
  (PREFOPT_JOB_CONFIG); the entrypoint writes it to a file and runs `prefopt train` on it through
  prefopt.launch.job_entry, which first says in one line what the nodes' Python cannot import.
  A sweep (plan_sweep) travels the same way: its sweep file and method configs in
  PREFOPT_JOB_FILES, unpacked by job_entry, and `prefopt sweep` with the arguments given here. An environment variable travels with every kind of runtime env, `image_uri` included
  (which takes nothing but env_vars), and leaves the user's checkout untouched; base64, because
  Ray expands `$NAME` in every env_vars value on the node (ray._private.utils.update_envs). The shipped
  config says `cluster.address: auto` when it said nothing: the driver joins the cluster it
  runs on;
- the code, when asked (default: the current directory when it is a prefopt checkout): a zip
  built here with the excludes below and .gitignore, measured against Ray's upload limit
  before anything is sent, and uploaded as the job's working_dir;
- the tracking URI by MLflow's convention (tracking.uri, else the submitter's
  MLFLOW_TRACKING_URI) and the credentials that go with it, when set here;
- optionally pip requirements or a container image.

The cluster's nodes are read from the dashboard's state API before submitting, and a role no
node could hold is refused here, in seconds, with check_fits's message (for a sweep: the roles of
its largest trial, check_sweep_resources). Addresses are the
dashboard's HTTP address (http://HEAD:8265); a token for Ray's token authentication is taken
from where Ray keeps it (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token) and sent
whatever RAY_AUTH_MODE says on this machine: the cluster's mode is the one that matters.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import os
import re
import secrets
import shlex
import sys
import time
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NamedTuple

import yaml

from prefopt.config import RoleConfig, RunConfig
from prefopt.errors import CLUSTER, SERVICE, UserError
from prefopt.launch import FILES_ENV

if TYPE_CHECKING:
    from prefopt.sweep.spec import Sweep, Trial

# Ray's own order (ray.dashboard.utils.get_address_for_submission_client).
ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
CONFIG_ENV = "PREFOPT_JOB_CONFIG"
ENTRY = "python -m prefopt.launch.job_entry"  # the nodes' python: the image's, or on ray start's PATH
TRACKING_ENV = "MLFLOW_TRACKING_URI"
# Passed to the job when set here: MLflow's credentials and S3-style artifact stores.
CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                  "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_S3_ENDPOINT_URL")
# Left out of the uploaded code (gitignore patterns; .gitignore and .rayignore are honoured too).
EXCLUDES = (".git", ".venv", "venv", "__pycache__", "runs/", "mlruns/", "mlartifacts/", "*.db",
            ".pytest_cache/", ".ruff_cache/", ".mypy_cache/", "*.egg-info/", "build/", "dist/")
PROBE_TIMEOUT_S = 5.0
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class LaunchError(UserError, ValueError):
    """A submission or job request that cannot go as asked; the message says what to change."""


class ClusterUnreachable(UserError, ConnectionError):
    exit_code = SERVICE


class JobFailed(UserError, RuntimeError):
    """A job that ended FAILED or STOPPED."""

    exit_code = CLUSTER


# ----------------------------------------------------------------------------- address and auth


def resolve_address(address: str | None, environ: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """(the dashboard's URL, where it came from): --address, else RAY_API_SERVER_ADDRESS, else
    RAY_ADDRESS. `host:port` means http://host:port."""
    source = "--address"
    if not address:
        source, address = next(((k, environ[k]) for k in ADDRESS_ENV if environ.get(k)), ("", ""))
    if not address:
        raise LaunchError("no Ray cluster address: pass --address http://HEAD:8265 (the head's dashboard) "
                          f"or set {' or '.join(ADDRESS_ENV)}")
    if address == "auto" or address.startswith("ray://"):
        raise LaunchError(f"{source}={address}: give the HTTP address of the head's dashboard "
                          "(http://HEAD:8265), not a Ray Client or 'auto' address")
    if "://" not in address:
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise LaunchError(f"{source}={address}: give the HTTP address of the head's dashboard (http://HEAD:8265)")
    return address.rstrip("/"), source


def token_source(environ: Mapping[str, str] = os.environ) -> str:
    """Where Ray reads its auth token from on this machine, as a message names it."""
    if environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"RAY_AUTH_TOKEN_PATH={environ['RAY_AUTH_TOKEN_PATH']}"
    return "~/.ray/auth_token"


def auth_headers() -> dict[str, str]:
    """{'authorization': 'Bearer ...'} when a Ray auth token is found in Ray's usual places, else {}."""
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # read the environment as it is now
    try:
        return dict(loader.get_token_for_http_header(ignore_auth_mode=True))
    except Exception as exc:  # e.g. RAY_AUTH_TOKEN_PATH names a missing or empty file
        raise LaunchError(f"Ray auth token: {_first_sentence(str(exc))}; fix RAY_AUTH_TOKEN_PATH "
                          "or set RAY_AUTH_TOKEN") from None


def _first_sentence(text: str) -> str:
    line = (text.strip().splitlines() or [""])[0]
    return line.split(". ", 1)[0].rstrip(".")


def _reason(exc: Exception, timeout_s: float) -> str:
    """A requests exception in a few words ('Connection refused', 'no answer in 5s')."""
    import requests

    if isinstance(exc, requests.exceptions.Timeout):
        return f"no answer in {timeout_s:g}s"
    found = re.findall(r"\[Errno -?\d+\] ([^'\")]+)", str(exc))
    return found[-1].strip() if found else type(exc).__name__


def probe(url: str, headers: Mapping[str, str], *, source: str = "--address",
          timeout_s: float = PROBE_TIMEOUT_S) -> str:
    """Ask the dashboard its Ray version, in seconds; one clear error for no answer (exit 4),
    a missing or rejected auth token, or something that is not a Ray dashboard (exit 2)."""
    import requests

    where = url if source == "--address" else f"{url} (from {source})"
    try:
        reply = requests.get(f"{url}/api/version", headers=dict(headers), timeout=timeout_s)
    except requests.exceptions.RequestException as exc:
        raise ClusterUnreachable(
            f"no Ray dashboard answers at {where} ({_reason(exc, timeout_s)}); start the cluster "
            "(ray start --head), or fix the address: the head's dashboard, http://HEAD:8265") from None
    if reply.status_code == 401:
        raise LaunchError(
            f"the Ray cluster at {where} wants an auth token and none was found here: set RAY_AUTH_TOKEN, "
            "point RAY_AUTH_TOKEN_PATH at the token file, or write it to ~/.ray/auth_token "
            "(`ray get-auth-token` on the head prints it)")
    if reply.status_code == 403:
        raise LaunchError(
            f"the Ray cluster at {where} rejected the auth token from {token_source()}: set RAY_AUTH_TOKEN "
            "(or RAY_AUTH_TOKEN_PATH) to the cluster's token (`ray get-auth-token` on the head prints it)")
    try:
        reply.raise_for_status()
        return str(reply.json()["ray_version"])
    except (requests.exceptions.HTTPError, ValueError, KeyError, TypeError):
        raise LaunchError(f"{where} answers (HTTP {reply.status_code}) but is not a Ray dashboard; give the "
                          "head's dashboard address, http://HEAD:8265") from None


@contextlib.contextmanager
def _without_env(names: tuple[str, ...]) -> Iterator[None]:
    """Ray's SDK lets RAY_ADDRESS override the address it is given; here --address wins."""
    saved = {k: os.environ.pop(k) for k in names if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


# ----------------------------------------------------------------------------- the jobs client


class Outcome(NamedTuple):
    code: int  # 0 succeeded, CLUSTER (3) failed or stopped
    line: str  # one line that says what happened


class Jobs:
    """The Job Submission API of one cluster, with one-line errors and fast failure."""

    def __init__(self, address: str | None = None, *, timeout_s: float = PROBE_TIMEOUT_S):
        self.url, self.source = resolve_address(address)
        self.headers = auth_headers()
        self.ray_version = probe(self.url, self.headers, source=self.source, timeout_s=timeout_s)
        with self._errors(), _without_env(ADDRESS_ENV):
            from ray.job_submission import JobSubmissionClient

            _quiet_ray_sdk()
            self.client = JobSubmissionClient(self.url, headers=dict(self.headers))

    @contextlib.contextmanager
    def _errors(self, job_id: str | None = None) -> Iterator[None]:
        """The SDK's exceptions as one line each."""
        import requests
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError as exc:
            raise LaunchError(f"the Ray cluster at {self.url}: {_first_sentence(str(exc))}; set RAY_AUTH_TOKEN "
                              "to the cluster's token (`ray get-auth-token` on the head prints it)") from None
        except (ConnectionError, requests.exceptions.ConnectionError) as exc:
            raise ClusterUnreachable(f"the Ray dashboard at {self.url} stopped answering "
                                     f"({_reason(exc, PROBE_TIMEOUT_S)})") from None
        except (ValueError, TypeError) as exc:  # a runtime env Ray refuses (pip, image_uri, ...)
            raise LaunchError(f"Ray refused the job: {_first_sentence(str(exc))}") from None
        except RuntimeError as exc:
            text = str(exc)
            if job_id is not None and "404" in text:
                raise LaunchError(f"no job {job_id!r} on the cluster at {self.url} (prefopt job list "
                                  f"--address {self.url} shows the jobs there)") from None
            raise LaunchError(f"the Ray cluster at {self.url}: {_first_sentence(text)}") from None

    def nodes(self, timeout_s: float = 15.0) -> list[dict[str, float]] | None:
        """Each live node's total resources, from the dashboard's state API; None when it does not
        say (an older or trimmed dashboard): then the job checks on connect."""
        import requests

        try:
            reply = requests.get(f"{self.url}/api/v0/nodes", headers=dict(self.headers), timeout=timeout_s,
                                 params={"limit": 10000, "timeout": int(timeout_s), "detail": "false"})
            rows = reply.json()["data"]["result"]["result"]
            return [{k: float(v) for k, v in row["resources_total"].items()}
                    for row in rows if row.get("state") == "ALIVE"]
        except (requests.exceptions.RequestException, ValueError, KeyError, TypeError):
            return None

    def submit(self, plan: Submission) -> str:
        with self._errors():
            return self.client.submit_job(entrypoint=plan.entrypoint, runtime_env=plan.runtime_env,
                                          submission_id=plan.submission_id, metadata=plan.metadata)

    def info(self, job_id: str):
        with self._errors(job_id):
            return self.client.get_job_info(job_id)

    def logs(self, job_id: str) -> str:
        with self._errors(job_id):
            return self.client.get_job_logs(job_id)

    def stop(self, job_id: str) -> bool:
        with self._errors(job_id):
            return self.client.stop_job(job_id)

    def list_jobs(self) -> list:
        with self._errors():
            return self.client.list_jobs()

    def follow(self, job_id: str, out: IO[str] | None = None) -> Any:
        """Stream the job's logs to `out` until it ends (tail_job_logs is a coroutine: one event
        loop for the whole stream); its final JobDetails."""
        out = out or sys.stdout

        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(job_id):
                out.write(chunk)
                out.flush()

        self.info(job_id)  # an unknown job: one line, before any stream
        try:
            asyncio.run(tail())
        except Exception as exc:  # the stream broke (aiohttp, a closed socket): the status still says
            logging.getLogger(__name__).warning("the log stream of job %s broke (%s); waiting for its status",
                                                job_id, _first_sentence(str(exc)) or type(exc).__name__)
        return self.wait(job_id)

    def wait(self, job_id: str, timeout_s: float | None = None, poll_s: float = 0.5) -> Any:
        """Poll until the job reaches a terminal status (or timeout_s passes); its JobDetails."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            info = self.info(job_id)
            if str(info.status) in TERMINAL or (deadline is not None and time.monotonic() > deadline):
                return info
            time.sleep(poll_s)

    def outcome(self, info: Any) -> Outcome:
        failed = str(info.status) == "FAILED"
        return describe_outcome(info, self.logs(info.submission_id or info.job_id) if failed else "")


def describe_outcome(info: Any, logs: str) -> Outcome:
    """0 and a line for a job that succeeded; CLUSTER (3) and the reason for one that did not:
    the driver's own last `error:` line when it printed one, else Ray's message."""
    job_id = info.submission_id or info.job_id
    status = str(info.status)
    if status == "SUCCEEDED":
        return Outcome(0, f"job {job_id} SUCCEEDED")
    if status == "STOPPED":
        return Outcome(CLUSTER, f"job {job_id} was stopped")
    if status != "FAILED":
        return Outcome(CLUSTER, f"job {job_id} is {status}")
    reason = last_error_line(logs) or _first_sentence(info.message or "no message")
    exited = f" (its command exited with {info.driver_exit_code})" if info.driver_exit_code else ""
    return Outcome(CLUSTER, f"job {job_id} FAILED{exited}: {reason}")


def _quiet_ray_sdk() -> None:
    # The SDK logs every request and upload at INFO; prefopt says what matters itself.
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)


def last_error_line(logs: str) -> str | None:
    """The last `error: ...` line a prefopt driver printed, without the prefix."""
    lines = [line[len("error:"):].strip() for line in logs.splitlines() if line.startswith("error:")]
    return lines[-1] if lines else None


# ----------------------------------------------------------------------------- what a job asks for


def roles_of(cfg: RunConfig) -> list[tuple[str, str, RoleConfig]]:
    """(name in messages, config section, role) of every role `prefopt train` starts for this
    config: its algorithm's spec (prefopt.algorithm_spec) decides."""
    from prefopt.algorithm_spec import placements

    return placements(cfg)


def check_resources(cfg: RunConfig, nodes: list[dict[str, float]], where: str) -> None:
    """Refuse, naming the field and the shortfall, a role that no placement on `nodes` could hold."""
    from prefopt.algorithm_spec import placements, spec_for
    from prefopt.cluster.worker_group import ClusterError, check_fit_together, check_fits

    roles = roles_of(cfg)
    try:
        for name, key, role in roles:
            check_fits(name, key, role, nodes=nodes)
        check_fit_together(placements(cfg, spec_for(cfg).alive_together(cfg)), nodes=nodes)
    except ClusterError as exc:
        raise ClusterError(f"the cluster at {where}: {exc}") from None


def trial_need(cfg: RunConfig) -> tuple[float, float]:
    """(GPUs, CPUs) a sweep trial of `cfg` reserves at once: its placement group's bundles."""
    from prefopt.algorithm_spec import trial_bundles

    bundles, _ = trial_bundles(cfg)
    return sum(b.get("GPU", 0.0) for b in bundles), sum(b.get("CPU", 0.0) for b in bundles)


def largest_trial(sweep: Sweep) -> Trial:
    """The valid trial that reserves the most GPUs, then CPUs; a sweep without one is refused,
    naming the first trial's error."""
    valid = sweep.valid_trials()
    if not valid:
        first = sweep.trials[0]
        raise LaunchError(f"{sweep.source}: none of the sweep's {len(sweep.trials)} trial(s) has a valid config; "
                          f"the first, {first.id}: {first.error}")
    return max(valid, key=lambda t: trial_need(t.config))


def check_sweep_resources(sweep: Sweep, nodes: list[dict[str, float]], where: str) -> None:
    """check_resources for the sweep's largest trial, and its placement group (every rank of its
    roles, held together while it runs) against the whole cluster: Ray Tune would queue a trial
    that can never be placed forever. The refusal names the trial."""
    from prefopt.cluster.worker_group import ClusterError

    trial = largest_trial(sweep)
    gpus, cpus = trial_need(trial.config)
    try:
        check_resources(trial.config, nodes, where)
        for resource, need in (("GPU", gpus), ("CPU", cpus)):
            have = sum(node.get(resource, 0.0) for node in nodes)
            if need > have:
                raise ClusterError(f"the cluster at {where} has {have:g} {resource}; lower its roles' num_workers "
                                   "or cpus_per_worker/gpus_per_worker, or add nodes")
    except ClusterError as exc:
        raise ClusterError(f"sweep {sweep.name}: its largest trial, {trial.id} ({gpus:g} GPU, {cpus:g} CPU at "
                           f"once), cannot run: {exc}") from None


# ----------------------------------------------------------------------------- the code package


def is_prefopt_checkout(path: Path) -> bool:
    """A directory holding prefopt's source: pyproject.toml naming the project prefopt."""
    try:
        text = (path / "pyproject.toml").read_text()
    except OSError:
        return False
    # The [project] table up to the next table (tomllib is Python 3.11+; prefopt runs on 3.10).
    table = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    named = table is not None and re.search(r"^name\s*=\s*[\"']prefopt[\"']\s*$", table.group(1), re.M)
    return bool(named) and (path / "prefopt" / "__init__.py").is_file()


def upload_limit() -> int:
    """The largest working_dir package a job submission can send: the dashboard's request limit
    (100 MiB in Ray 2.60) or the GCS's message limit, whichever is smaller."""
    try:
        from ray._private.ray_constants import DASHBOARD_CLIENT_MAX_SIZE
        from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE
    except ImportError:  # a Ray that moved them: its 2.60 values
        return 100 * 2**20
    return min(DASHBOARD_CLIENT_MAX_SIZE, GCS_STORAGE_MAX_SIZE)


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def build_package(source: Path, dest_dir: Path, *, excludes: tuple[str, ...] = (),
                  limit: int | None = None) -> Path:
    """Zip `source` as the job's working_dir, leaving out EXCLUDES, `excludes`, Ray's own default
    excludes and what .gitignore / .rayignore ignore (Ray's packer, so the set is what Ray would
    send), and refuse it in one line naming the largest files when it is over the upload limit."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import create_package

    if not source.is_dir():
        raise LaunchError(f"--working-dir {source}: not a directory")
    limit = upload_limit() if limit is None else limit
    quiet = logging.getLogger("prefopt.launch.package")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    include_gitignore = os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    package = dest_dir / f"{source.resolve().name or 'workdir'}.zip"
    package.unlink(missing_ok=True)
    create_package(str(source), package, include_gitignore=include_gitignore, logger=quiet,
                   excludes=[*ray_constants.get_runtime_env_default_excludes(), *EXCLUDES, *excludes])
    size = package.stat().st_size
    if size >= limit:
        with zipfile.ZipFile(package) as zf:
            biggest = sorted(zf.infolist(), key=lambda i: i.compress_size, reverse=True)[:3]
        names = ", ".join(f"{i.filename} ({_mib(i.compress_size)})" for i in biggest)
        raise LaunchError(f"--working-dir {source}: the code package is {_mib(size)} zipped, over Ray's upload "
                          f"limit of {_mib(limit)}; largest: {names}; add them to .rayignore or --exclude, "
                          "or --no-working-dir with prefopt installed on the cluster")
    return package


# ----------------------------------------------------------------------------- the submission


@dataclass
class Submission:
    entrypoint: str
    runtime_env: dict[str, Any]
    submission_id: str
    metadata: dict[str, str]
    notes: list[str] = field(default_factory=list)  # warnings for the person submitting


def shipped_config(cfg: RunConfig) -> RunConfig:
    """The config the job runs: as resolved here, joining the cluster it runs on unless it names one."""
    if cfg.cluster.address is not None:
        return cfg
    return cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"address": "auto"})})


def parse_env(pairs: list[str] | None) -> dict[str, str]:
    env = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise LaunchError(f"--env {pair}: expected NAME=VALUE")
        env[key] = value
    return env


def job_env(cfg: RunConfig, environ: Mapping[str, str], extra: dict[str, str]) -> dict[str, str]:
    """The job's environment: the tracking URI by MLflow's convention and its credentials when set
    here, DS_ACCELERATOR=cpu for an all-CPU run (as a local run sets it), then --env."""
    env: dict[str, str] = {}
    uri = cfg.tracking.uri or environ.get(TRACKING_ENV)
    if uri:
        env[TRACKING_ENV] = uri
    for key in CREDENTIAL_ENV:
        if environ.get(key):
            env[key] = environ[key]
    from prefopt.storage import store_env

    env.update(store_env(environ))  # output_dir or the RefCache on an object store
    if not any(role.gpus_per_worker for _, _, role in roles_of(cfg)):
        env["DS_ACCELERATOR"] = "cpu"
    # The driver's ray.init adds worker variables (prefopt.cluster.ray_setup) that may repeat the
    # job's; Ray refuses such a merge unless told that the driver's values win (they are equal).
    env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    env.update(extra)
    return env


def encode_config(cfg: RunConfig) -> str:
    """The config's YAML as the job's environment carries it: base64, no `$` for Ray to expand."""
    return base64.b64encode(cfg.to_yaml().encode()).decode("ascii")


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name) or "config.yaml"


def entrypoint(config_name: str) -> str:
    """The job's shell command: the shipped YAML into a fresh file, then `prefopt train` on it."""
    name = shlex.quote(_file_name(config_name))
    return (f'dir=$(mktemp -d) && printenv {CONFIG_ENV} | base64 -d > "$dir"/{name} && '
            f'exec {ENTRY} train "$dir"/{name}')


def sweep_entrypoint(name: str, args: list[str]) -> str:
    """A sweep job's shell command: job_entry unpacks the shipped files into a fresh folder, then
    runs `prefopt sweep` on `name` there with `args`."""
    return (f'dir=$(mktemp -d) && exec {ENTRY} --unpack "$dir" sweep "$dir"/{shlex.quote(name)}'
            + "".join(f" {shlex.quote(a)}" for a in args))


def sweep_args(grids: list[str] | None = None, seeds: int | None = None, sets: list[str] | None = None,
               max_concurrent: int | None = None) -> list[str]:
    """`prefopt sweep`'s options as given to `prefopt submit`, for the job to run with."""
    args = [a for g in grids or [] for a in ("--grid", g)]
    args += ["--seeds", str(seeds)] if seeds is not None else []
    args += ["--max-concurrent", str(max_concurrent)] if max_concurrent is not None else []
    return args + [a for s in sets or [] for a in ("--set", s)]


def _joining(tree: dict | None) -> str:
    """A config's YAML as shipped: joining the cluster it runs on unless it names one (shipped_config)."""
    tree = dict(tree or {})
    cluster = tree.get("cluster")
    if cluster is None:
        tree["cluster"] = {"address": "auto"}
    elif isinstance(cluster, dict) and cluster.get("address") is None:
        tree["cluster"] = {**cluster, "address": "auto"}
    return yaml.safe_dump(tree, sort_keys=False)


def sweep_files(path: Path) -> tuple[str, dict[str, str]]:
    """(the name `prefopt sweep` reads, the files a sweep's job carries: relative path -> text).
    A sweep file travels with its method and prepare-stage configs under methods/, its `config:`
    entries (relative to it) pointed there, and a method without a config gets one; a run config (a --grid sweep)
    travels alone. Each config joins the cluster it runs on unless it names one, as a run's does."""
    name = _file_name(path.name)
    from prefopt.sweep.spec import is_sweep_file

    if not is_sweep_file(path):
        return name, {name: _joining(yaml.safe_load(path.read_text()))}
    sweep = yaml.safe_load(path.read_text())
    files: dict[str, str] = {}
    shipped: dict[str, str] = {}  # the config's path here -> its path in the job
    # Methods' configs and prepare stages' configs travel alike (a stage's under the same folder).
    entries = [*sweep["methods"].items(), *(sweep.get("prepare") or {}).items()]
    for method_name, method in entries:
        source = method.get("config")
        key = str((path.parent / source).resolve()) if source is not None else f"<defaults of {method_name}>"
        if key not in shipped:
            stem = _file_name(Path(source).stem if source is not None else method_name)
            target = f"methods/{stem}.yaml"
            for i in itertools.count(2):
                if target not in files:
                    break
                target = f"methods/{stem}-{i}.yaml"
            shipped[key] = target
            files[target] = _joining(yaml.safe_load(Path(key).read_text()) if source is not None else {})
        method["config"] = shipped[key]
    files[name] = yaml.safe_dump(sweep, sort_keys=False)
    return name, files


def _pip(specs: list[str] | None) -> list[str] | str | None:
    """--pip values: requirement specs, or one requirements file (Ray reads it here)."""
    if not specs:
        return None
    if len(specs) == 1 and Path(specs[0]).is_file():
        return str(Path(specs[0]).resolve())
    return list(specs)


def plan(cfg: RunConfig, config_path: Path, *, package: Path | None, pip: list[str] | None = None,
         image: str | None = None, env: list[str] | None = None,
         environ: Mapping[str, str] = os.environ) -> Submission:
    """Everything the job is submitted with; refuses option combinations Ray would refuse."""
    extra = parse_env(env)
    _check_image(image, package, pip)
    variables = {**job_env(cfg, environ, extra), CONFIG_ENV: encode_config(shipped_config(cfg))}
    notes = _notes(cfg.output_dir, variables.get(TRACKING_ENV), "tracking.uri" if cfg.tracking.uri else TRACKING_ENV)
    return Submission(entrypoint(config_path.name), _runtime_env(variables, package, pip, image),
                      _submission_id(cfg.algorithm.name), _metadata(config_path, cfg.tracking.experiment), notes)


def plan_sweep(sweep: Sweep, path: Path, args: list[str], *, package: Path | None, pip: list[str] | None = None,
               image: str | None = None, env: list[str] | None = None,
               environ: Mapping[str, str] = os.environ) -> Submission:
    """A whole sweep as one job: `prefopt sweep` on the sweep file (or run config) at `path`, which
    load_sweep read into `sweep` here, with `args` (sweep_args); its files in PREFOPT_JOB_FILES.
    The job's environment is that of the largest trial (DS_ACCELERATOR=cpu when it has no GPU)."""
    extra = parse_env(env)
    _check_image(image, package, pip)
    largest = largest_trial(sweep).config
    # The trials' tracking.uri was resolved here (a local default store is a path on this
    # machine); the job resolves its own from the shipped configs and MLFLOW_TRACKING_URI.
    variables = job_env(largest.model_copy(update={"tracking": largest.tracking.model_copy(update={"uri": None})}),
                        environ, extra)
    name, files = sweep_files(path)
    variables[FILES_ENV] = base64.b64encode(json.dumps(files).encode()).decode("ascii")
    notes = _notes(sweep.output_dir, sweep.tracking_uri, "the sweep's tracking store")
    metadata = {**_metadata(path, sweep.experiment or largest.tracking.experiment), "prefopt.sweep": sweep.name}
    return Submission(sweep_entrypoint(name, args), _runtime_env(variables, package, pip, image),
                      _submission_id(f"sweep-{sweep.name}"), metadata, notes)


def _check_image(image: str | None, package: Path | None, pip: list[str] | None) -> None:
    if image and (package is not None or pip):
        what = "a working dir" if package is not None else "--pip"
        raise LaunchError(f"--image cannot go with {what}: Ray's image_uri takes only environment variables; "
                          "bake the code and requirements into the image (and pass --no-working-dir)")


def _runtime_env(variables: dict[str, str], package: Path | None, pip: list[str] | None,
                 image: str | None) -> dict[str, Any]:
    runtime_env: dict[str, Any] = {"env_vars": variables}
    if package is not None:
        runtime_env["working_dir"] = str(package)
    if (requirements := _pip(pip)) is not None:
        runtime_env["pip"] = requirements
    if image:
        runtime_env["image_uri"] = image
    return runtime_env


def _submission_id(what: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"prefopt-{re.sub(r'[^a-z0-9]+', '-', what.lower()).strip('-')}-{stamp}-{secrets.token_hex(2)}"


def _metadata(config_path: Path, experiment: str) -> dict[str, str]:
    import prefopt

    return {"prefopt.config": str(config_path), "prefopt.experiment": experiment,
            "prefopt.version": prefopt.__version__}


def _notes(output_dir: str, uri: str | None, source: str) -> list[str]:
    """Warnings for the person submitting: where a relative output_dir and a file tracking store end up."""
    notes = []
    if not Path(output_dir).expanduser().is_absolute() and "://" not in output_dir:
        notes.append(f"output_dir={output_dir} is relative: the run's files (checkpoints, exported model) "
                     "land under the job's working directory on the node that runs the driver")
    if not uri or uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        where = f"{source}={uri}" if uri else "no tracking.uri and no MLFLOW_TRACKING_URI here"
        notes.append(f"{where}: the MLflow store is a file on the node that runs the driver; set tracking.uri "
                     "or MLFLOW_TRACKING_URI to a tracking server to see the run from here")
    return notes


def default_working_dir(cwd: Path) -> Path | None:
    return cwd if is_prefopt_checkout(cwd) else None

"""Where runs are stored: the tracking URI, the artifact root beside a SQLite file, experiments.

MLflow's own convention decides where runs go, for `train`, `compare`, `runs` and submitted jobs
alike: `tracking.uri` when the config sets it, else the `MLFLOW_TRACKING_URI` environment
variable when set, else the embedded default: one SQLite file for all runs of a project (with
`output_dir: runs/<name>` every run lands in `runs/mlflow.db` and its artifacts in
`runs/mlartifacts/`, so runs with different output folders can be compared). Any other MLflow URI
is used as given; an HTTP server decides itself where artifacts go.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from prefopt.config import RunConfig
from prefopt.errors import SERVICE, UserError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Experiment

STORE_FILE = "mlflow.db"
ENV_URI = "MLFLOW_TRACKING_URI"  # MLflow's own variable, read the way every MLflow tool reads it
ARTIFACT_DIR = "mlartifacts"


class TrackingError(UserError, RuntimeError):
    """A tracking problem the user can fix; the message says what to do."""

    exit_code = SERVICE


def default_store_dir(output_dir: str | Path) -> Path:
    """The folder holding the default store: the parent of the run's output_dir, absolute."""
    return Path(output_dir).expanduser().resolve().parent


def resolve_tracking_uri(cfg: RunConfig) -> str:
    """The MLflow tracking URI of a run: `tracking.uri`, else $MLFLOW_TRACKING_URI, else the
    project's SQLite file (see tracking_uri_source).

    Relative SQLite paths are made absolute, so that a resumed or compared run finds the same
    file from another working directory.
    """
    return tracking_uri_for(cfg.tracking.uri, cfg.output_dir)


def tracking_uri_for(uri: str | None, output_dir: str) -> str:
    """resolve_tracking_uri from the two fields it reads (a sweep resolves it before any trial's
    config is whole)."""
    if uri:
        return _absolute_sqlite(uri)
    if os.environ.get(ENV_URI):
        return _absolute_sqlite(os.environ[ENV_URI])
    from prefopt.storage import is_remote

    if is_remote(output_dir):
        raise TrackingError(f"output_dir is on an object store ({output_dir}) and MLflow's default store "
                            "sits beside a local output_dir: set tracking.uri (an MLflow server, or "
                            f"sqlite:///path/mlflow.db) or {ENV_URI}")
    return _sqlite_uri(default_store_dir(output_dir) / STORE_FILE)


def tracking_uri_source(cfg: RunConfig) -> str:
    """What decided resolve_tracking_uri's answer, as messages name it."""
    if cfg.tracking.uri:
        return "tracking.uri"
    if os.environ.get(ENV_URI):
        return ENV_URI
    return "output_dir (the default store sits beside it)"


def _sqlite_uri(path: Path) -> str:
    return "sqlite:///" + path.as_posix()  # an absolute path gives the four slashes


def _absolute_sqlite(uri: str) -> str:
    path = sqlite_file(uri)
    if path is None:
        return uri
    query = uri[uri.index("?"):] if "?" in uri else ""
    return _sqlite_uri(path) + query


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///path` URI (absolute), None for any other URI."""
    if not uri.startswith("sqlite:///"):
        return None
    raw = uri[len("sqlite:///"):].split("?", 1)[0]
    if not raw or raw == ":memory:":
        return None
    return Path(raw).expanduser().resolve()


def artifact_root(uri: str) -> str | None:
    """Where new experiments keep artifacts: beside a SQLite file, else the server's choice.

    MLflow's own default for a SQLite store is `./mlruns` of whatever directory the process
    happens to run in; artifacts must sit next to the database to stay findable.
    """
    db = sqlite_file(uri)
    return (db.parent / ARTIFACT_DIR).as_uri() if db is not None else None


def ui_hint(uri: str) -> str:
    """How a person opens this store in a browser."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


def slug(name: str) -> str:
    """A folder name for an experiment name ('my exp/1' -> 'my-exp-1')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "experiment"


def _quiet_mlflow() -> None:
    # prefopt.tracking sets MLFLOW_LOGGING_LEVEL before MLflow is imported; this covers the
    # case where something else imported MLflow first.
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from mlflow.telemetry.client import get_telemetry_client, set_telemetry_client

    if get_telemetry_client() is not None:
        set_telemetry_client()  # re-reads MLFLOW_DISABLE_TELEMETRY, which is set by now


def mlflow_client(uri: str) -> MlflowClient:
    """An MlflowClient for `uri`; creates the folder of a SQLite file."""
    from mlflow import MlflowClient

    _quiet_mlflow()
    db = sqlite_file(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def get_or_create_experiment(client: MlflowClient, name: str, uri: str) -> str:
    """The id of experiment `name`, created (with artifacts beside a SQLite store) if new."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        root = artifact_root(uri)
        location = f"{root}/{slug(name)}" if root else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)  # created by a concurrent run
            assert experiment is not None
    if experiment.lifecycle_stage != "active":
        raise TrackingError(
            f"experiment {name!r} in {uri} is deleted; restore it "
            f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) "
            "or set tracking.experiment to another name"
        )
    return experiment.experiment_id


def find_experiment(client: MlflowClient, name: str, uri: str) -> Experiment:
    """An existing, active experiment, or a TrackingError that lists the ones there are."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None and experiment.lifecycle_stage == "active":
        return experiment
    names = sorted(e.name for e in client.search_experiments())
    known = ", ".join(names) if names else "none"
    raise TrackingError(f"no experiment {name!r} in {uri} (experiments there: {known})")


def check_reachable(cfg: RunConfig, timeout_s: float = 5.0) -> None:
    """Fail in seconds, naming tracking.uri, when the store cannot be used: an HTTP server that
    does not answer, or a SQLite file whose folder cannot be created. Other schemes (postgresql,
    databricks, ...) are left to MLflow."""
    import urllib.error
    import urllib.request

    uri = resolve_tracking_uri(cfg)
    field = tracking_uri_source(cfg)
    db = sqlite_file(uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(f"{field}: cannot create the folder of the MLflow store {db}: {exc.strerror}") from None
        return
    if uri.startswith(("http://", "https://")):
        try:  # any HTTP answer means a server listens; only no answer at all is fatal
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(f"{field}: no MLflow server answers at {uri} ({reason}); start one "
                                f"(mlflow server ...), fix the address, or unset {field} for the local "
                                "SQLite store") from None

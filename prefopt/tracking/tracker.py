"""One MLflow run per training run, written by the controller only.

    with Tracker.start(cfg) as tracker:          # FAILED if the block raises, KILLED on Ctrl-C
        tracker.log_config()
        tracker.set_tags({TAG_DATA_FINGERPRINT: fp})
        tracker.log_metrics({"loss": 0.69, "rewards/margins": 0.0}, step=1)
        tracker.log_generations([{"prompt": p, "completion": c, "reward": r}], step=50)
        tracker.log_model_dir(export_dir)

Resuming: `Tracker.start(cfg, run_id=saved_id)` continues the same MLflow run, so metric
histories simply go on at the steps the trainer logs.
"""

from __future__ import annotations

import getpass
import json
import logging
import math
import shutil
import subprocess
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

import prefopt
from prefopt.config import RunConfig
from prefopt.tracking.store import (
    TrackingError,
    get_or_create_experiment,
    mlflow_client,
    resolve_tracking_uri,
)

log = logging.getLogger(__name__)

# Tag names. `loss` is set for the offline family only; compare groups runs by `loss`, falling
# back to `algorithm` (so PPO runs form the series "ppo").
TAG_ALGORITHM = "algorithm"
TAG_LOSS = "loss"
TAG_VERSION = "prefopt.version"
TAG_GIT_COMMIT = "mlflow.source.git.commit"  # MLflow's own name: the UI shows it
TAG_DATA_FINGERPRINT = "data.fingerprint"
TAG_REFCACHE_FINGERPRINT = "refcache.fingerprint"
TAG_EVAL_LIMITS = "eval.limits"  # set (to N) on a run that logged limits.json
TAG_EVAL_FINGERPRINT = "eval.fingerprint"  # prompts, sampler, samples per prompt, KL estimator (prefopt.eval)
TAG_COMPARISON = "prefopt.comparison"  # marks the runs `prefopt compare` writes
TAG_PARAMS_CHANGED = "prefopt.params_changed_on_resume"
# A sweep (prefopt.sweep): its id on the parent run and on every trial's run, and each trial's own.
TAG_SWEEP = "prefopt.sweep"
TAG_SWEEP_TRIAL = "prefopt.sweep.trial"
TAG_SWEEP_POINT = "prefopt.sweep.point"
TAG_SWEEP_SEED = "prefopt.sweep.seed"
TAG_SWEEP_METHOD = "prefopt.sweep.method"
TAG_SWEEP_PARENT = "prefopt.sweep.parent"  # "true" on the parent run
TAG_SWEEP_STAGE = "prefopt.sweep.stage"  # a prepare stage's name on its run (the SFT model, a reward model)
TAG_PARENT_RUN = "mlflow.parentRunId"  # MLflow's own: the UI nests the run under its parent

CONFIG_ARTIFACT = "config.yaml"
LIMITS_ARTIFACT = "limits.json"  # best-of-N and the optimum from the reference's samples (prefopt.eval.limits)
MODEL_ARTIFACT = "model"
GENERATIONS_DIR = "generations"

# MLflow servers older than 2.8 (still common) reject param values over 500 characters; the
# complete value is always in the config.yaml artifact.
PARAM_VALUE_LIMIT = 500
_TRUNCATED = "...[truncated; see config.yaml]"
_BATCH = 100  # MLflow's limit of params or tags per log_batch call
# Who else hears every logged step, as listener(step, metrics): a sweep trial passes them to Ray Tune.
LISTENERS: list = []
_STATUSES = ("FINISHED", "FAILED", "KILLED")


def flatten_config(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{'train': {'lr': 1e-4}} -> {'train.lr': '0.0001'}: MLflow params as strings.

    Strings are kept as they are, everything else is written as JSON (null, true, [0.9, 0.999])
    and cut to PARAM_VALUE_LIMIT characters.
    """
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, prefix=f"{name}."))
        else:
            flat[name] = param_value(value)
    return flat


def param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if len(text) > PARAM_VALUE_LIMIT:
        text = text[: PARAM_VALUE_LIMIT - len(_TRUNCATED)] + _TRUNCATED
    return text


def algorithm_tags(cfg: RunConfig) -> dict[str, str]:
    """{'algorithm': 'offline', 'loss': 'dpo'} for the offline losses, else {'algorithm': name}:
    as the algorithm's spec says (prefopt.algorithm_spec, a declaration beside the config)."""
    from prefopt.algorithm_spec import spec_for

    return spec_for(cfg).tags(cfg)


def git_commit(path: Path | None = None) -> str | None:
    """HEAD of the git checkout holding `path` (default: the prefopt package), else None."""
    git = shutil.which("git")
    if git is None:
        return None
    where = path or Path(prefopt.__file__).resolve().parent
    try:
        done = subprocess.run(
            [git, "-C", str(where), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


def default_run_name(cfg: RunConfig) -> str:
    return f"{cfg.algorithm.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _now_ms() -> int:
    return int(time.time() * 1000)


class Tracker:
    """The MLflow run of one training run. Create it with `Tracker.start`."""

    def __init__(self, client: MlflowClient, cfg: RunConfig, run_id: str, *, experiment_id: str,
                 tracking_uri: str, resumed: bool) -> None:
        self.client = client
        self.cfg = cfg
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.tracking_uri = tracking_uri
        self.resumed = resumed
        self.finished = False

    @property
    def run_url(self) -> str | None:
        """The run's page when the store is a tracking server (else see store.ui_hint)."""
        if not self.tracking_uri.startswith(("http://", "https://")):
            return None
        base = self.tracking_uri.rstrip("/")
        return f"{base}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def start(cls, cfg: RunConfig, *, run_id: str | None = None,
              tags: Mapping[str, Any] | None = None) -> Tracker:
        """Open a new run in `tracking.experiment`, or continue run `run_id` (a resume).

        `tags` are added to (and may override) the automatic ones: algorithm, loss, prefopt
        version, git commit when known.
        """
        uri = resolve_tracking_uri(cfg)
        client = mlflow_client(uri)
        auto = {**algorithm_tags(cfg), TAG_VERSION: prefopt.__version__}
        if commit := git_commit():
            auto[TAG_GIT_COMMIT] = commit
        try:
            auto["mlflow.user"] = getpass.getuser()
        except (KeyError, OSError):  # no user name in a bare container
            pass
        given = {k: str(v) for k, v in (cfg.tracking.tags | dict(tags or {})).items() if v is not None}
        if run_id is None:
            experiment_id = get_or_create_experiment(client, cfg.tracking.experiment, uri)
            run = client.create_run(
                experiment_id,
                run_name=cfg.tracking.run_name or default_run_name(cfg),
                tags={**auto, **given},
            )
            return cls(client, cfg, run.info.run_id, experiment_id=experiment_id,
                       tracking_uri=uri, resumed=False)

        try:
            run = client.get_run(run_id)
        except MlflowException as exc:
            raise TrackingError(f"cannot resume MLflow run {run_id!r} in {uri}: "
                                f"{exc.message}") from None
        if run.info.lifecycle_stage != "active":
            raise TrackingError(f"cannot resume MLflow run {run_id!r} in {uri}: it is deleted")
        experiment = client.get_experiment(run.info.experiment_id)
        if experiment.name != cfg.tracking.experiment:
            log.warning("resumed run %s stays in experiment %r (config says %r)",
                        run_id, experiment.name, cfg.tracking.experiment)
        client.update_run(run_id, status="RUNNING")
        tracker = cls(client, cfg, run_id, experiment_id=experiment.experiment_id,
                      tracking_uri=uri, resumed=True)
        # The version and commit of the code that continues the run; algorithm stays.
        tracker.set_tags({k: v for k, v in {**auto, **given}.items()
                          if k not in (TAG_ALGORITHM, TAG_LOSS) or k in given})
        return tracker

    def finish(self, status: str = "FINISHED") -> None:
        """End the run as FINISHED, FAILED or KILLED. A second call does nothing."""
        if status not in _STATUSES:
            raise ValueError(f"status must be one of {', '.join(_STATUSES)}, got {status!r}")
        if self.finished:
            return
        self.client.set_terminated(self.run_id, status=status)
        self.finished = True

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.finish("FINISHED")
            return False
        status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        try:
            self.finish(status)
        except Exception as err:  # never hide the training error behind a tracking one
            log.warning("could not mark MLflow run %s as %s: %s", self.run_id, status, err)
        return False

    # ------------------------------------------------------------------ logging

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log one logging step: names as in docs/tracking.md ('loss', 'rewards/margins', 'eval/kl').

        Values may be floats, ints or 0-d tensors; None values are skipped; NaN and inf are
        logged as they are (a diverged run should show it).
        """
        now = _now_ms()
        batch = [Metric(key, float(value), now, int(step))
                 for key, value in metrics.items() if value is not None]
        for i in range(0, len(batch), 1000):  # MLflow's limit of metrics per call
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])
        for listener in LISTENERS:
            listener(step, {key: float(value) for key, value in metrics.items() if value is not None})

    def last_step(self, key: str) -> int:
        """The highest step logged for `key` in this run (0 when none)."""
        return max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=0)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags, e.g. {TAG_DATA_FINGERPRINT: ..., TAG_REFCACHE_FINGERPRINT: ...}."""
        items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, tags=items[i:i + _BATCH])

    def log_data_input(self, data, context: str = "training") -> None:
        """The run's data as an MLflow dataset input: where it came from and its fingerprint, and,
        for pairs made by `prefopt label`, the label manifest beside them (generator, sampling,
        scorer), so a run shows where its pairs came from."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        source = data.report.source
        profile = {"rows": data.num_rows, "format": data.format}
        path = Path(source.split(" (")[0])
        manifest = path.parent / "manifest.json" if path.is_file() else None
        if manifest is not None and manifest.is_file():
            profile["made_by"] = json.loads(manifest.read_text())
        dataset = Dataset(name=path.name if path.is_file() else source, digest=data.fingerprint[:36],
                          source_type="local" if path.exists() else "prefopt_task",
                          source=json.dumps({"uri": str(path.resolve()) if path.exists() else source}),
                          profile=json.dumps(profile, default=str))
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])

    def log_config(self) -> None:
        """The resolved config as `config.yaml` and as flattened params ('train.lr').

        MLflow params cannot change once logged. On a resumed run, params whose value changed
        keep their first value; their names go to the tag prefopt.params_changed_on_resume and
        config.yaml is replaced by the config the run continues with.
        """
        self.client.log_text(self.run_id, self.cfg.to_yaml(), CONFIG_ARTIFACT)
        # Tags are tags (set by start), not params.
        params = flatten_config(self.cfg.model_dump(mode="json", exclude={"tracking": {"tags"}}))
        if self.resumed:
            logged = self.client.get_run(self.run_id).data.params
            changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
            if changed:
                log.warning("resumed run %s: params keep their first values, changed: %s",
                            self.run_id, ", ".join(changed))
                self.set_tags({TAG_PARAMS_CHANGED: ", ".join(changed)})
            params = {k: v for k, v in params.items() if k not in logged}
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + _BATCH])

    def log_generations(self, rows: list[Mapping[str, Any]], step: int) -> str | None:
        """Sample generations as an MLflow table `generations/step_0000050.json`.

        Each row is one sample ({'prompt': ..., 'completion': ..., 'reward': ...}); columns are
        the union of the rows' keys plus `step`. Returns the artifact path (None if no rows).
        """
        if not rows:
            return None
        columns: list[str] = ["step"]
        for row in rows:
            columns += [k for k in row if k not in columns]
        table = {c: [step if c == "step" else _cell(row.get(c)) for row in rows] for c in columns}
        path = f"{GENERATIONS_DIR}/step_{int(step):07d}.json"
        with warnings.catch_warnings():  # pandas deprecations raised inside MLflow's log_table
            warnings.simplefilter("ignore", DeprecationWarning)
            self.client.log_table(self.run_id, data=table, artifact_file=path)
        return path

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        """A JSON artifact `name` (replaced when logged again)."""
        self.client.log_dict(self.run_id, dict(data), name)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload one file or a whole directory under `artifact_path`."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)
        else:
            raise FileNotFoundError(f"cannot log {path}: no such file or directory")

    def log_model_dir(self, path: str | Path,
                      register_as: str | None = None) -> ModelVersion | None:
        """Upload an exported model directory as artifacts `model/`, when `tracking.log_model`.

        With `register_as` (default `tracking.register_model`) the upload also becomes a new
        version of that registered model, which is returned.
        """
        from prefopt.storage import is_remote, localize

        if not is_remote(path) and not Path(path).is_dir():
            raise FileNotFoundError(f"cannot log model {path}: not a directory")
        if not self.cfg.tracking.log_model:
            return None
        path = localize(path)  # an export on an object store: MLflow uploads from a local copy
        self.client.log_artifacts(self.run_id, str(path), MODEL_ARTIFACT)
        name = register_as or self.cfg.tracking.register_model
        if not name:
            return None
        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        artifact_uri = self.client.get_run(self.run_id).info.artifact_uri
        return self.client.create_model_version(
            name, source=f"{artifact_uri}/{MODEL_ARTIFACT}", run_id=self.run_id
        )


def _cell(value: Any) -> Any:
    """A table cell JSON can hold: numbers and strings as they are, tensors as floats."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)

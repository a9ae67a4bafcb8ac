"""What a sweep is: methods, each a base config and a grid, times seeds -> one trial per point and seed.

    sweep = load_sweep("configs/tiny/dpo.yaml", grids=["algorithm.beta=0.05,0.1"], seeds=2)
    sweep = load_sweep("configs/sweeps/dpo_vs_ppo.yaml")     a sweep file (a top-level `methods:`)
    for trial in sweep.trials:  trial.id, trial.config (a RunConfig) or trial.error (an invalid point)

A sweep file:

    name: dpo-vs-ppo                 # default: the file's stem
    seeds: 3                         # or a list: [0, 5, 9]
    max_concurrent: null             # default: as many trials as the cluster holds
    output_dir: runs/sweeps/dpo-vs-ppo   # default: runs/sweeps/<name>; trials in <output_dir>/<trial id>
    set: {train.max_steps: 40}       # applied to every method
    methods:
      dpo:
        config: ../tiny/dpo.yaml     # relative to this file
        grid: {algorithm.beta: [0.05, 0.1, 1, 5]}
      ppo:
        config: ../tiny/ppo.yaml
        set: {eval.every_steps: 10}
        grid: {ppo.kl_target: [3, 6, 9, 12]}

A trial's seed sets train.seed, data.seed and ppo.sampling.seed (initialisation, data order, PPO's
rollouts); the evaluation's prompts and sampler stay those of the config, the same for every trial,
so that trials compare like for like. A point whose config does not validate becomes a trial with
an `error` (it fails alone, named in the summary); the sweep itself is refused only for a bad file.

A declaration: no Ray, no torch; the runner (prefopt.sweep.runner) and `prefopt submit` read it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from prefopt.config import ConfigError, RunConfig, build_config, parse_override

# The fields a trial's seed sets: what a training draws at random, not what it is evaluated on.
SEED_FIELDS = ("train.seed", "data.seed", "ppo.sampling.seed")
TRIAL_STATUS = "sweep-trial.json"  # in a trial's output_dir once it has ended: finished or failed


class SweepError(ConfigError):
    """The sweep file or a --grid is malformed (one line naming the file and the key)."""


class MethodSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: str | None = Field(None, description="run config, relative to the sweep file")
    set: dict[str, Any] = Field(default_factory=dict, description="dotted key -> value")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="dotted key -> values")

    @field_validator("grid")
    @classmethod
    def _axes_have_values(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"{key}: an axis needs at least one value")
        return grid


class PrepareSpec(BaseModel):
    """A stage run once before the trials (the SFT model, samples, pairs, a reward model); trials
    and later stages name its output as {sweep_dir}/prepare/<name>."""

    model_config = ConfigDict(extra="forbid")

    command: Literal["train", "generate", "label"]
    config: str | None = Field(None, description="run config, relative to the sweep file")
    set: dict[str, Any] = Field(default_factory=dict)


class SweepFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1)
    experiment: str | None = Field(None, min_length=1, description="default: the first method's tracking.experiment")
    seeds: int | list[int] = 1
    max_concurrent: int | None = Field(None, ge=1)
    output_dir: str | None = None
    set: dict[str, Any] = Field(default_factory=dict)
    prepare: dict[str, PrepareSpec] = Field(default_factory=dict, description="in order, before the trials")
    methods: dict[str, MethodSpec] = Field(min_length=1)

    @field_validator("seeds")
    @classmethod
    def _some_seeds(cls, seeds: int | list[int]) -> int | list[int]:
        if (isinstance(seeds, int) and seeds < 1) or (isinstance(seeds, list) and not seeds):
            raise ValueError("at least one seed (a count, or a list of seeds)")
        if isinstance(seeds, list) and len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds repeat: {seeds}")
        return seeds


@dataclass
class Trial:
    """One point of one method with one seed: a whole training run of its own."""

    id: str  # its folder under the sweep's output_dir and its MLflow run name
    method: str
    point: dict[str, Any]  # the grid's values at this point (dotted key -> value)
    seed: int
    tree: dict  # the config tree it trains with
    config: RunConfig | None = None  # None when the point's config is invalid
    error: str | None = None  # why it is invalid, one line

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "method": self.method, "point": self.point, "seed": self.seed,
                           "tree": self.tree})

    @classmethod
    def from_json(cls, text: str) -> Trial:
        data = json.loads(text)
        return cls(**data, config=RunConfig.model_validate(data["tree"]))


@dataclass
class Stage:
    """A prepare stage, resolved: its command and its whole config (output_dir under the sweep's)."""

    name: str
    command: str
    config: RunConfig


@dataclass
class Sweep:
    name: str
    output_dir: str
    seeds: list[int]
    methods: dict[str, MethodSpec]
    trials: list[Trial] = field(default_factory=list)
    max_concurrent: int | None = None
    source: str = "<command line>"
    experiment: str | None = None  # every trial's and the parent run's MLflow experiment
    tracking_uri: str | None = None
    prepare: list[Stage] = field(default_factory=list)

    @property
    def id(self) -> str:
        """Names the sweep in MLflow: its name and where its trials live."""
        return f"{self.name}-{hashlib.sha256(self.output_dir.encode()).hexdigest()[:8]}"

    def valid_trials(self) -> list[Trial]:
        return [t for t in self.trials if t.config is not None]

    def params(self) -> dict[str, str]:
        """The parent run's params: each method's grid and config, and the seeds."""
        out = {"seeds": json.dumps(self.seeds), "trials": str(len(self.trials))}
        for name, method in self.methods.items():
            out[f"{name}.config"] = method.config or "<defaults>"
            for key, values in method.grid.items():
                out[f"{name}.grid.{key}"] = json.dumps(values)
        return out


def is_sweep_file(path: str | Path) -> bool:
    """A YAML file whose top level has `methods:` (a run config never has)."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(loaded, dict) and "methods" in loaded


def parse_grid(text: str) -> tuple[str, list[Any]]:
    """'algorithm.beta=0.05,0.1' -> ('algorithm.beta', [0.05, 0.1]); values typed as --set types them."""
    if "=" not in text:
        raise SweepError(f"--grid {text!r}: expected section.field=value1,value2,...")
    key, raw = text.split("=", 1)
    values = [parse_override(f"{key}={part}")[1] for part in raw.split(",") if part.strip()]
    if not values:
        raise SweepError(f"--grid {text!r}: no values after '='")
    return key.strip(), values


def load_sweep(path: str | Path, *, grids: list[str] = (), seeds: int | None = None, sets: list[str] = (),
               max_concurrent: int | None = None, output_dir: str | None = None) -> Sweep:
    """A sweep from a sweep file, or from one run config and --grid axes. --grid, --seeds and --set
    add to (or replace) what the file says, for every method."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"{path}: no such file")
    extra_grid = dict(parse_grid(g) for g in grids)
    extra_set = dict(_dotted(s) for s in sets)
    if is_sweep_file(path):
        spec = _read_sweep_file(path)
        base_dir = path.parent
        name = spec.name or path.stem
        for method in spec.methods.values():
            method.grid |= extra_grid
        methods, file_set = spec.methods, spec.set
        seed_list = _seed_list(spec.seeds if seeds is None else seeds)
        max_concurrent = max_concurrent or spec.max_concurrent
        output_dir = output_dir or spec.output_dir
        experiment = spec.experiment
    else:
        if not extra_grid and seeds is None:
            raise SweepError(f"{path} is a run config: give at least one --grid section.field=v1,v2 or --seeds N "
                             "(or write a sweep file with methods:, docs/sweeps.md)")
        base_dir = Path(".")
        name = path.stem
        tree = _read_yaml(path)
        method_name = str((tree.get("algorithm") or {}).get("name", "dpo"))
        methods = {method_name: MethodSpec(config=str(path), grid=extra_grid)}
        file_set, seed_list, experiment = {}, _seed_list(seeds or 1), None
    sweep = Sweep(name=name, output_dir=output_dir or f"runs/sweeps/{name}", seeds=seed_list, methods=methods,
                  max_concurrent=max_concurrent, source=str(path), experiment=experiment)
    prepare = spec.prepare if is_sweep_file(path) else {}
    for method_name, method in methods.items():
        base = _base(base_dir, method.config, file_set | method.set | extra_set, sweep, source=str(path))
        method.grid = {key: _expand(values, sweep) for key, values in method.grid.items()}
        _one_tracking_store(sweep, base)
        sweep.trials.extend(_trials(sweep, method_name, method, base))
    for name, stage in prepare.items():
        tree = _base(base_dir, stage.config, file_set | stage.set | extra_set, sweep, source=str(path))
        _set(tree, "output_dir", f"{sweep.output_dir.rstrip('/')}/prepare/{name}", source=str(path))
        _set(tree, "tracking.run_name", f"prepare-{name}", source=str(path))
        _set(tree, "tracking.uri", sweep.tracking_uri, source=str(path))
        _set(tree, "tracking.experiment", sweep.experiment, source=str(path))
        sweep.prepare.append(Stage(name, stage.command, build_config(tree, source=f"{path}: prepare {name}")))
    _check_unique(sweep)
    return sweep


def _base(base_dir: Path, config: str | None, sets: dict[str, Any], sweep: Sweep, *, source: str) -> dict:
    """A method's or a stage's config tree: its file (relative to the sweep file) and its sets,
    with {sweep_dir} standing for the sweep's output_dir (a stage's output: {sweep_dir}/prepare/NAME)."""
    path = None if config is None else (base_dir / config if base_dir != Path(".") else Path(config))
    tree = _read_yaml(path) if path is not None else {}
    for key, value in sets.items():
        _set(tree, key, _expand(value, sweep), source=f"{source}: set {key}")
    return tree


def _expand(value: Any, sweep: Sweep) -> Any:
    if isinstance(value, str):
        return value.replace("{sweep_dir}", sweep.output_dir.rstrip("/"))
    if isinstance(value, list):
        return [_expand(v, sweep) for v in value]
    return value


def _trials(sweep: Sweep, method_name: str, method: MethodSpec, base: dict) -> list[Trial]:
    keys = list(method.grid)
    short = _short_names(keys)
    trials = []
    for values in itertools.product(*(method.grid[k] for k in keys)):
        point = dict(zip(keys, values, strict=True))
        label = "-".join([method_name] + [f"{short[k]}={_slug(v)}" for k, v in point.items()])
        for seed in sweep.seeds:
            trial_id = f"{label}-s{seed}"
            tree = json.loads(json.dumps(base))  # a deep copy of plain YAML data
            for key, value in point.items():
                _set(tree, key, value, source=f"{sweep.source}: grid {key}")
            for key in SEED_FIELDS:
                _set(tree, key, seed, source=f"{sweep.source}: seed")
            _set(tree, "output_dir", f"{sweep.output_dir.rstrip('/')}/{trial_id}", source=sweep.source)
            _set(tree, "tracking.run_name", trial_id, source=sweep.source)
            trial = Trial(trial_id, method_name, point, seed, tree)
            try:
                trial.config = build_config(tree, source=f"trial {trial_id}")
            except ConfigError as exc:
                trial.error = " ".join(str(exc).split("\n"))
            trials.append(trial)
    return trials


def _one_tracking_store(sweep: Sweep, base: dict) -> None:
    """Every trial logs to one MLflow store and experiment, those of the first method's config (the
    store beside its output_dir by default, not beside the trials' folders), so that the parent run
    and `prefopt compare` see them all."""
    from prefopt.tracking.store import tracking_uri_for

    if sweep.tracking_uri is None:
        tracking = base.get("tracking") or {}
        sweep.tracking_uri = tracking_uri_for(tracking.get("uri"), str(base.get("output_dir", "runs/default")))
        sweep.experiment = sweep.experiment or tracking.get("experiment") or "prefopt"
    _set(base, "tracking.uri", sweep.tracking_uri, source=sweep.source)
    _set(base, "tracking.experiment", sweep.experiment, source=sweep.source)


def _short_names(keys: list[str]) -> dict[str, str]:
    """An axis's name in trial ids: its last part ('beta'), or the whole key where two would clash."""
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", str(value))


def _check_unique(sweep: Sweep) -> None:
    seen: set[str] = set()
    for trial in sweep.trials:
        if trial.id in seen:
            raise SweepError(f"{sweep.source}: two trials are both named {trial.id} (a value repeats on an axis)")
        seen.add(trial.id)


def _seed_list(seeds: int | list[int]) -> list[int]:
    if isinstance(seeds, int):
        if seeds < 1:
            raise SweepError(f"--seeds {seeds}: at least one seed")
        return list(range(seeds))
    return list(seeds)


def _dotted(text: str) -> tuple[str, Any]:
    keys, value = parse_override(text)
    return ".".join(keys), value


def _set(tree: dict, dotted: str, value: Any, *, source: str) -> None:
    node = tree
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SweepError(f"{source}: {'.'.join(parts[:i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise SweepError(f"{path}: no such config file")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SweepError(f"{path}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise SweepError(f"{path}: the top level must be a mapping")
    return loaded or {}


def _read_sweep_file(path: Path) -> SweepFile:
    try:
        return SweepFile.model_validate(_read_yaml(path))
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            problems.append(f"{path}: {where}: {err['msg'].removeprefix('Value error, ')}")
        raise SweepError("\n".join(problems)) from None

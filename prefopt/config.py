"""One validated config tree for every prefopt run.

A run is described by a YAML file plus `--set section.field=value` overrides. Everything is
checked before any process starts: an unknown key, a wrong type or an out-of-range value
raises `ConfigError`, whose message names the file and the dotted field path and says what
is allowed. The CLI prints that message as one line and exits non-zero.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Offline preference losses (see prefopt.losses and REFERENCES.md). `kto` is unpaired.
PAIRWISE_LOSSES = (
    "dpo", "robust", "hinge", "ipo", "nca_pair", "bco_pair", "sppo_hard", "apo_zero",
    "apo_down", "discopop", "simpo", "cpo", "orpo", "gpo",
)
ALGORITHMS = (*PAIRWISE_LOSSES, "kto", "sft")


class ConfigError(ValueError):
    """A config that cannot run; the message is meant for the user, one problem per line."""


class Section(BaseModel):
    # extra="forbid" is what turns a misspelled key into an error instead of a silent default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelConfig(Section):
    """A small Llama built from this config when `model.path` is not given (no hub needed)."""

    vocab_size: int = Field(1024, ge=300, le=65536, description="BPE vocabulary incl. specials")
    hidden_size: int = Field(64, ge=8)
    intermediate_size: int = Field(128, ge=8)
    num_hidden_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int = Field(2, ge=1)
    max_position_embeddings: int = Field(512, ge=16)
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be divisible by num_key_value_heads")
        return self


class ModelConfig(Section):
    path: str | None = Field(
        None, description="Hugging Face model directory; null builds the tiny model below"
    )
    tiny: TinyModelConfig = TinyModelConfig()
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class DataConfig(Section):
    """Preference data: where it comes from, its format, and how it is cut (docs/data.md)."""

    path: str | None = Field(
        None,
        description="JSONL / Parquet / CSV file, a saved HF dataset (save_to_disk), "
        "or a directory of data files for datasets.load_dataset",
    )
    task: str | None = Field("imdb_sentiment", description="built-in task when path is null")
    format: Literal[
        "auto", "preference", "conversational", "implicit_prompt", "unpaired", "prompt_only"
    ] = "auto"
    max_length: int = Field(256, ge=2, description="prompt + completion tokens")
    max_prompt_length: int = Field(
        64, ge=1, description="longer prompts are bad rows (no_room), never cut"
    )
    on_bad_row: Literal["error", "skip"] = "error"
    packing: bool = True
    num_examples: int | None = Field(None, ge=1, description="cap on examples read (debugging)")
    seed: int = 0
    split: str = Field(
        "train", min_length=1, description="split of a HF dataset; train/test of a built-in task"
    )
    ignore_columns: list[str] = Field(
        default_factory=list, description="extra columns to drop (any other extra column is an error)"
    )
    assistant_marker: str = Field(
        "\n\nAssistant:", min_length=1,
        description="implicit_prompt text format: the prompt ends at the last marker both share",
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be smaller than max_length")
        return self


class AlgorithmConfig(Section):
    """Which loss or algorithm runs, and its parameters (names as in REFERENCES.md)."""

    name: Literal[ALGORITHMS] = "dpo"  # type: ignore[valid-type]
    # None means "the loss's own default" (e.g. beta 0.1 for dpo, 2.0 for simpo).
    beta: float | None = Field(None, gt=0)
    label_smoothing: float | None = Field(None, ge=0, lt=0.5)
    gamma: float | None = None
    tau: float | None = Field(None, gt=0)
    sft_weight: float | None = Field(None, ge=0)
    desirable_weight: float | None = Field(None, gt=0)
    undesirable_weight: float | None = Field(None, gt=0)
    # The GPO view (name: gpo): loss = function(beta * (score_c - score_r) - gamma).
    function: Literal["logistic", "hinge", "squared", "exponential", "truncated_squared", "savage"] | None = None
    score: Literal["sum_logratio", "avg_logratio", "sum_logp", "avg_logp"] | None = None

    def loss_params(self) -> dict[str, float | str]:
        """The parameters the user set, to pass to prefopt.losses as keyword arguments."""
        fields = ("beta", "label_smoothing", "gamma", "tau", "sft_weight",
                  "desirable_weight", "undesirable_weight", "function", "score")
        return {f: getattr(self, f) for f in fields if getattr(self, f) is not None}

    @model_validator(mode="after")
    def _params_fit_the_loss(self) -> AlgorithmConfig:
        # The loss library owns which parameters each loss takes; ask it now, before any
        # process starts, rather than on the first training step.
        if self.name == "sft":
            if self.loss_params():
                raise ValueError(f"sft takes no loss parameters (got {', '.join(self.loss_params())})")
            return self
        from prefopt.losses import resolve_params

        resolve_params(self.name, **self.loss_params())
        return self


class RefConfig(Section):
    mode: Literal["cache", "live", "none"] = Field(
        "cache", description="cache: precompute once and reuse; live: per batch; none: ref-free"
    )
    cache_dir: str | None = Field(None, description="local path or s3://, gs://; default under output_dir")
    num_replicas: int = Field(1, ge=1)
    offload: bool = Field(
        False, description="serve the reference with DeepSpeed ZeRO-3 inference, parameters in CPU memory "
        "(for a reference larger than the GPU beside the policy; no gain on CPU-only machines)")


class ClusterConfig(Section):
    address: str | None = Field(None, description="Ray address; null starts a local Ray")
    num_workers: int = Field(1, ge=1, description="policy ranks (one DeepSpeed rank each)")
    gpus_per_worker: float = Field(0, ge=0)
    cpus_per_worker: float = Field(1, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    collective_timeout_s: int = Field(600, ge=10, description="fail a hung collective after this")


class DeepSpeedConfig(Section):
    zero_stage: int = Field(3, ge=0, le=3)
    offload_optimizer: bool = False
    offload_param: bool = False
    gradient_clipping: float = Field(1.0, ge=0, description="0 disables clipping")
    extra: dict[str, Any] = Field(
        default_factory=dict, description="merged into the generated DeepSpeed config"
    )

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DeepSpeedConfig:
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("offload_param needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        return self


class TrainConfig(Section):
    lr: float = Field(5e-4, gt=0, le=1)
    micro_batch_size: int = Field(4, ge=1, description="pairs per rank per forward")
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_steps: int = Field(100, ge=1, description="optimizer steps")
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    seed: int = 0
    log_steps: int = Field(1, ge=1)
    save_steps: int = Field(50, ge=1)


class TrackingConfig(Section):
    """Where the controller logs the run (see prefopt.tracking and docs/tracking.md)."""

    uri: str | None = Field(
        None,
        description="MLflow tracking URI (http://host:5000, sqlite:///..., postgresql://...); "
        "null: sqlite:///<parent of output_dir>/mlflow.db, artifacts in mlartifacts/ beside it",
    )
    experiment: str = Field("prefopt", min_length=1)
    run_name: str | None = Field(None, description="null: '<algorithm>-<YYYYmmdd-HHMMSS>'")
    log_model: bool = Field(True, description="log the exported model directory as artifacts")
    register_model: str | None = Field(
        None, min_length=1, description="also register the logged model under this name"
    )


class EvalConfig(Section):
    every_steps: int = Field(50, ge=1)
    num_prompts: int = Field(64, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0)


class RunConfig(Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    ref: RefConfig = RefConfig()
    cluster: ClusterConfig = ClusterConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    eval: EvalConfig = EvalConfig()
    output_dir: str = "runs/default"

    @model_validator(mode="after")
    def _data_source(self) -> RunConfig:
        if self.data.path is None and self.data.task is None:
            raise ValueError("set data.path (a file) or data.task (a built-in task)")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ----------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=1e-4' -> (['train', 'lr'], 0.0001). Values are typed by YAML's rules."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.field=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"--set {text!r}: empty name in dotted path {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. an unbalanced bracket): let the field's type judge it
    # YAML 1.1 reads "1e-4" as a string; pydantic's numeric fields still accept it.
    return path, value


def _set_dotted(tree: dict, path: list[str], value: Any, *, source: str) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            dotted = ".".join(path[: i + 1])
            raise ConfigError(f"{source}: {dotted} is a value, not a section; cannot set {'.'.join(path)}")
        node = child
    node[path[-1]] = value


def _allowed_keys(model: type[BaseModel], path: tuple) -> list[str]:
    """Field names allowed at a dotted path inside RunConfig (for 'did you mean' hints)."""
    for part in path:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields)


def _describe(err: dict) -> str:
    loc = tuple(err["loc"])
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(RunConfig, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"{dotted}: unknown key{hint} (allowed: {', '.join(allowed)})"
    msg = err["msg"]
    if err["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    return f"{dotted}: {msg}{shown}"


def build_config(tree: dict, *, source: str) -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors()]
        raise ConfigError("\n".join(f"{source}: {p}" for p in problems)) from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config (or the defaults when path is None) and apply --set overrides."""
    source = str(path) if path is not None else "<defaults>"
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: no such config file")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{source}:{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections")
        tree = loaded or {}
    for text in overrides:
        keys, value = parse_override(text)
        _set_dotted(tree, keys, value, source=f"{source} (--set {text})")
    label = source + (" with --set overrides" if overrides else "")
    return build_config(tree, source=label)

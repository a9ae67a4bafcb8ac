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

from prefopt.errors import UserError
from prefopt.losses.names import needs_reference, resolve_params


class ConfigError(UserError, ValueError):
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


# LoRA's default targets: every linear layer of a Llama-like decoder block (attention and MLP).
LLAMA_LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraConfig(Section):
    """Train low-rank adapters (peft's LoRA) instead of every weight; the base weights stay frozen
    and are the reference with the adapters switched off (docs/lora.md)."""

    rank: int = Field(16, ge=1, description="r: the adapters' inner dimension")
    alpha: float = Field(32, gt=0, description="the update is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        list(LLAMA_LINEAR_LAYERS), description="module names (suffixes) that get adapters; 'all-linear': "
        "every linear layer but the output layer (peft)")
    train_fully: list[str] = Field(
        default_factory=list, description="modules trained in full beside the adapters (a scalar head, "
        "'score', always is)")
    merge_on_export: bool = Field(
        False, description="export also output_dir/model as a plain model with the adapters merged in")

    @model_validator(mode="after")
    def _some_targets(self) -> LoraConfig:
        if not self.target_modules:
            raise ValueError("target_modules: name at least one module (or 'all-linear')")
        return self


class ModelConfig(Section):
    path: str | None = Field(
        None, description="Hugging Face model directory (a local path or s3://, gs://); null builds the tiny model below"
    )
    tiny: TinyModelConfig = TinyModelConfig()
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    lora: LoraConfig | None = Field(None, description="set: the trained roles train LoRA adapters (docs/lora.md)")


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
    heldout_path: str | None = Field(
        None, description="held-out pairs of the same format (reward_model's accuracy); "
        "null: the built-in task's test split, if any")
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
    part_rows: int = Field(
        10_000, ge=1, description="rows prepared together: memory is a few parts', whatever the corpus "
        "size (docs/data.md, 'Large corpora')")
    num_proc: int | None = Field(
        None, ge=1, description="processes that prepare parts; null: one per CPU this "
        "process may use when 16 parts or more are to be prepared, else the calling process alone")

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be smaller than max_length")
        return self


class AlgorithmConfig(Section):
    """Which loss runs, and its parameters (formulas and papers: docs/losses.md).

    The losses own the loss names, which parameters each loss takes and their ranges, in
    prefopt.losses.names (no torch); this section only carries them, and asks it at load time.
    """

    name: str = "dpo"
    # None means "the loss's own default" (e.g. beta 0.1 for dpo, 2.0 for simpo).
    beta: float | None = None
    label_smoothing: float | None = None
    gamma: float | None = None
    tau: float | None = None
    sft_weight: float | None = None
    desirable_weight: float | None = None
    undesirable_weight: float | None = None
    # The GPO view (name: gpo): loss = function(beta * (score_c - score_r) - gamma).
    function: str | None = None
    score: str | None = None
    # The reward model (name: reward_model): -log sigmoid(r_c - r_r - margin) + center_weight (r_c + r_r)^2.
    margin: float | None = None
    center_weight: float | None = None

    def loss_params(self) -> dict[str, float | str]:
        """The parameters the user set, to pass to prefopt.losses as keyword arguments."""
        fields = [f for f in type(self).model_fields if f != "name"]
        return {f: getattr(self, f) for f in fields if getattr(self, f) is not None}

    @model_validator(mode="after")
    def _params_fit_the_loss(self) -> AlgorithmConfig:
        # Ask the losses now, before any process starts, rather than on the first step.
        if self.name in ROUND_ALGORITHMS:  # the loss they train is in their section: RunConfig checks
            return self
        if self.name in ONLINE_ALGORITHMS:  # their settings have their own section (ppo)
            if self.loss_params():
                raise ValueError(f"{', '.join(self.loss_params())}: not a setting of {self.name}; "
                                 f"its settings are in the {self.name} section")
            return self
        resolve_params(self.name, **self.loss_params())
        return self


# Algorithms that learn from their own samples, not from a loss over a fixed data set.
ONLINE_ALGORITHMS = ("ppo",)
# Multi-round algorithms (prefopt.algorithms.rounds) -> the config section of their schedule.
# Each round trains an offline loss (the section's `loss`, with algorithm.beta etc.) on data it grew.
ROUND_ALGORITHMS = {"rest": "rest", "iterative_dpo": "iterative"}


class DeepSpeedConfig(Section):
    zero_stage: int = Field(3, ge=0, le=3)
    offload_optimizer: bool = False
    offload_param: bool = Field(False, description="ZeRO-3: keep parameters in CPU memory, stream them in")
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


class RoleConfig(Section):
    """One model role (policy, reference; critic and reward next): its ranks and engine.

    Every role is a group of engine workers, one DeepSpeed rank per Ray actor."""

    num_workers: int = Field(1, ge=1, description="ranks (one Ray actor and DeepSpeed rank each)")
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    micro_batch_size: int = Field(4, ge=1, description="examples per rank per forward")
    score_batch_size: int | None = Field(
        None, ge=1, description="examples per rank per no-grad scoring forward (log-probs, values, rewards); "
        "null: micro_batch_size")
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()

    @property
    def score_batch(self) -> int:
        """score_batch_size, else micro_batch_size. A no-grad forward keeps no activations for a
        backward, so it can take more rows than a training one; null keeps memory as it was."""
        return self.score_batch_size or self.micro_batch_size


class PolicyConfig(RoleConfig):
    """The trained model (the `model` section): ZeRO-3 across its ranks; generates on the same ranks."""


class RefConfig(RoleConfig):
    """The frozen reference: never on a policy rank. Inference only (no optimizer), so ZeRO
    stage 0 (a plain copy per rank) unless its parameters are offloaded (zero_stage 3 +
    offload_param: a reference larger than the GPU beside the policy)."""

    model_path: str | None = Field(None, description="Hugging Face model dir; null: the policy's starting model")
    mode: Literal["cache", "live", "adapters_off", "none"] = Field(
        "cache", description="cache: precompute once and reuse; live: per batch; adapters_off (LoRA): "
        "the policy's own ranks with the adapters switched off, no second copy; none: ref-free"
    )
    cache_dir: str | None = Field(None, description="local path or s3://, gs://; default under output_dir")
    cpus_per_worker: float | None = Field(None, gt=0, description="null: as policy.cpus_per_worker")
    gpus_per_worker: float | None = Field(None, ge=0, description="null: as policy.gpus_per_worker")
    micro_batch_size: int | None = Field(None, ge=1, description="null: as policy.micro_batch_size")
    deepspeed: DeepSpeedConfig = DeepSpeedConfig(zero_stage=0)


class ClusterConfig(Section):
    """Where the roles run. Each role's ranks and resources are in its own section."""

    address: str | None = Field(None, description="Ray address; null starts a local Ray")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    collective_timeout_s: int = Field(600, ge=10, description="fail a hung collective after this")


class HealthConfig(Section):
    """The training-health guard: stop a run that has gone wrong instead of finishing it."""

    enabled: bool = True
    max_loss_ratio: float = Field(
        5.0, gt=1, description="stop when the loss stays above this multiple of its first step's value")
    patience: int = Field(5, ge=1, description="... for this many steps in a row (a non-finite loss or "
                          "gradient norm stops at once)")


class TrainConfig(Section):
    lr: float = Field(5e-4, gt=0, le=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_steps: int = Field(100, ge=1, description="optimizer steps")
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    seed: int = 0
    log_steps: int = Field(
        10, ge=1, description="log to MLflow every N steps (metrics.jsonl gets every step); the policy "
        "runs the steps between logging, saving and evaluation points in one call")
    save_steps: int = Field(50, ge=1)
    health: HealthConfig = HealthConfig()


class TrackingConfig(Section):
    """Where the controller logs the run (see prefopt.tracking and docs/tracking.md)."""

    uri: str | None = Field(
        None,
        description="MLflow tracking URI (http://host:5000, sqlite:///..., postgresql://...); "
        "null: $MLFLOW_TRACKING_URI when set, else sqlite:///<parent of output_dir>/mlflow.db, "
        "artifacts in mlartifacts/ beside it",
    )
    experiment: str = Field("prefopt", min_length=1)
    run_name: str | None = Field(None, description="null: '<algorithm>-<YYYYmmdd-HHMMSS>'")
    tags: dict[str, str] = Field(default_factory=dict, description="more tags on the run (a sweep's trials: "
                                 "the sweep, the point, the seed, the parent run)")
    log_model: bool = Field(True, description="log the exported model directory as artifacts")
    register_model: str | None = Field(
        None, min_length=1, description="also register the logged model under this name"
    )


class SamplingConfig(Section):
    """How the policy workers sample (prefopt.workers.generation)."""

    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0, description="log-probs returned are the model's own (temperature 1)")
    top_k: int = Field(0, ge=0, description="0: no top-k cut")
    top_p: float = Field(1.0, gt=0, le=1)
    greedy: bool = Field(False, description="argmax decoding (temperature, top_k, top_p unused)")
    seed: int = 0


class GrowConfig(Section):
    """A Grow step (ReST, iterative DPO): the current policy's samples of the data's prompts, scored
    by the reward role (reward.source), kept as a sharded data set (resumable, never sampled twice)."""

    samples_per_prompt: int = Field(4, ge=1, description="completions per prompt")
    num_prompts: int | None = Field(None, ge=1, description="prompts per Grow, taken in turn from the "
                                    "data's distinct prompts; null: all of them")
    sampling: SamplingConfig = SamplingConfig()
    prompts_per_shard: int = Field(64, ge=1, description="a killed Grow loses at most one shard")


class RestConfig(Section):
    """ReST (algorithm.name: rest; Gulcehre et al. 2023): each Grow step is followed by one Improve
    step per threshold, each training `improve_steps` optimizer steps on the grown samples whose
    reward passes its threshold (docs/rest.md)."""

    grow_steps: int = Field(1, ge=1)
    thresholds: list[float] = Field([0.5, 0.7, 0.9], min_length=1,
                                    description="one Improve step each, rising; in [0, 1) (threshold_on)")
    threshold_on: Literal["quantile", "normalised"] = Field(
        "quantile", description="quantile: of the grown set's rewards; normalised: the reward min-max "
        "scaled to [0, 1] over the grown set (the paper's)")
    improve_steps: int = Field(20, ge=1, description="optimizer steps per Improve step")
    loss: str = Field("sft", description="sft (the paper's best: NLL on the kept samples), or any "
                      "pairwise loss on the best-vs-worst pair of each prompt's kept samples")
    lr_decay: float = Field(1.0, gt=0, le=1, description="Improve step i of a Grow trains at train.lr x "
                            "lr_decay^i")
    mix_original: bool = Field(False, description="add the data's own rows (sft: the chosen completions) "
                               "to every Improve step's data")
    improve_from: Literal["previous", "grow"] = Field(
        "previous", description="previous: each Improve step goes on from the last one's policy (the "
        "paper's); grow: each starts again from the policy of its Grow step")
    grow: GrowConfig = GrowConfig(samples_per_prompt=8)


class IterativeConfig(Section):
    """Iterative on-policy DPO (algorithm.name: iterative_dpo): each round grows samples with the
    current policy, pairs them by the reward role and trains a pairwise loss on the pairs."""

    rounds: int = Field(3, ge=1)
    round_steps: int = Field(20, ge=1, description="optimizer steps per round")
    loss: str = Field("dpo", description="any pairwise loss (algorithm.beta etc. are its parameters)")
    reference: Literal["round_start", "initial"] = Field(
        "round_start", description="round_start: the policy as the round began; initial: the starting model")
    pairs: Literal["best_worst", "all_pairs", "best_random"] = "best_worst"
    min_gap: float = Field(0.0, ge=0, description="drop pairs whose rewards differ by no more than this")
    grow: GrowConfig = GrowConfig()


class JudgeConfig(Section):
    """An LLM judge (reward.source: judge): a causal LM asked a question from `template`; the score
    is read from its probabilities of the two `answers`' first tokens, never parsed from text.
    rating: p(answers[0]) for one completion ({prompt}, {completion}); pairwise: p(answers[0]) that
    {a} beats {b}, asked in both orders and averaged (position bias cancels, as in RLAIF).
    The causal LM is reward.model_path, or one served at `endpoint` (prefopt.algorithms.judge_http)."""

    mode: Literal["rating", "pairwise"] = "rating"
    template: str = Field(
        "Here is the start of a movie review and a continuation.\n\nStart: {prompt}\nContinuation: {completion}"
        "\n\nIs the continuation positive? Answer Yes or No.\nAnswer:",
        description="{prompt} and {completion} (rating), or {prompt}, {a} and {b} (pairwise)")
    answers: tuple[str, str] = Field((" Yes", " No"), description="rating: (good, bad); pairwise: (a wins, b wins)")
    endpoint: str | None = Field(None, description="base URL of an OpenAI-compatible server whose /completions "
                                 "echoes prompt log-probs (vLLM: http://127.0.0.1:8000/v1); null: the local causal "
                                 "LM at reward.model_path")
    model: str | None = Field(None, description="the model name sent to the endpoint (required with endpoint)")
    api_key_env: str = Field("OPENAI_API_KEY", description="env var holding the endpoint's bearer token; "
                             "unset: no Authorization header")
    timeout_s: float = Field(60.0, gt=0, description="per request to the endpoint")
    requests_in_flight: int = Field(4, ge=1, le=64, description="concurrent requests to the endpoint")
    questions_per_request: int = Field(8, ge=1, description="questions per request to the endpoint (each is "
                                       "sent as two prompts: question + each answer)")

    @model_validator(mode="after")
    def _endpoint(self) -> JudgeConfig:
        if self.endpoint is not None:
            if not self.endpoint.startswith(("http://", "https://")):
                raise ValueError(f"endpoint: {self.endpoint!r} is no http(s) URL (e.g. http://127.0.0.1:8000/v1)")
            if not self.model:
                raise ValueError("model: a judge endpoint needs the name of the model it serves")
        return self

    @model_validator(mode="after")
    def _placeholders(self) -> JudgeConfig:
        import string

        need = {"prompt", "completion"} if self.mode == "rating" else {"prompt", "a", "b"}
        have = {name for _, name, _, _ in string.Formatter().parse(self.template) if name}
        if need - have:
            raise ValueError(f"template: a {self.mode} template needs the placeholders "
                             f"{', '.join('{' + n + '}' for n in sorted(need))} (missing: "
                             f"{', '.join('{' + n + '}' for n in sorted(need - have))})")
        if have - need:
            raise ValueError(f"template: unknown placeholder(s) {', '.join('{' + n + '}' for n in sorted(have - need))} "
                             f"for mode {self.mode}")
        if self.answers[0] == self.answers[1]:
            raise ValueError("answers: the two answers must differ")
        return self


class RewardConfig(RoleConfig):
    """The reward role: what scores completions (`prefopt label`; PPO next). `task`: the built-in
    task's ground truth, on the controller; `model`: a trained reward model (a scalar-head
    directory, e.g. the export of algorithm reward_model) on its own ranks, reading text with
    its own tokenizer."""

    source: Literal["task", "model", "judge"] = "task"
    model_path: str | None = Field(None, description="reward model directory (source: model), or the "
                                   "judge's causal LM (source: judge)")
    judge: JudgeConfig = JudgeConfig()
    cpus_per_worker: float | None = Field(None, gt=0, description="null: as policy.cpus_per_worker")
    gpus_per_worker: float | None = Field(None, ge=0, description="null: as policy.gpus_per_worker")
    micro_batch_size: int | None = Field(None, ge=1, description="null: as policy.micro_batch_size")
    deepspeed: DeepSpeedConfig = DeepSpeedConfig(zero_stage=0)

    @model_validator(mode="after")
    def _model_for_model(self) -> RewardConfig:
        served = self.source == "judge" and self.judge.endpoint
        if served and self.model_path:
            raise ValueError(f"source: judge has both model_path ({self.model_path}) and judge.endpoint "
                             f"({self.judge.endpoint}); set model_path for a local judge or judge.endpoint for a "
                             "served one, not both")
        if self.source in ("model", "judge") and not (self.model_path or served):
            raise ValueError(f"source: {self.source} needs model_path (a "
                             + ("reward model directory)" if self.source == "model"
                                else "causal LM directory) or judge.endpoint (a served judge)"))
        return self


class GenerateConfig(Section):
    """`prefopt generate`: num_samples completions per prompt of the data, on the policy ranks."""

    num_samples: int = Field(4, ge=1, description="completions per prompt (the DPO paper's protocol: 4)")
    sampling: SamplingConfig = SamplingConfig()
    prompts_per_shard: int = Field(64, ge=1, description="a killed run loses at most one shard")
    output_dir: str | None = Field(None, description="null: <output_dir>/generated")


class LabelConfig(Section):
    """`prefopt label`: score the generated completions with the reward role, write a data set."""

    input_dir: str | None = Field(None, description="generated shards; null: generate.output_dir's default")
    output_dir: str | None = Field(None, description="null: <output_dir>/labelled")
    pairs: Literal["best_worst", "all_pairs", "best_random", "scored"] = Field(
        "best_worst", description="preference pairs per prompt (all_pairs: the DPO paper's 6 of 4 samples; "
        "best_random: UltraFeedback's binarised set), or scored completions")
    min_gap: float = Field(0.0, ge=0, description="drop pairs whose scores differ by no more than this")
    seed: int = 0


class CriticConfig(RoleConfig):
    """PPO's critic: a scalar-head model with its own engine group and optimizer (ZeRO-3 like
    the policy), reading the policy's tokens. Started only with ppo.advantage: gae."""

    model_path: str | None = Field(None, description="a reward model export (...ForSequenceClassification) "
                                   "or a causal LM; null: the policy's starting model with a new head")
    num_workers: int | None = Field(None, ge=1, description="null: as policy.num_workers")
    lr: float | None = Field(None, gt=0, le=1, description="null: train.lr")
    cpus_per_worker: float | None = Field(None, gt=0, description="null: as policy.cpus_per_worker")
    gpus_per_worker: float | None = Field(None, ge=0, description="null: as policy.gpus_per_worker")
    micro_batch_size: int | None = Field(None, ge=1, description="null: as policy.micro_batch_size")


class PPOConfig(Section):
    """PPO (algorithm.name: ppo): one train step is one iteration: sample, score, shape, GAE, update.
    Defaults, and where each comes from: docs/ppo.md."""

    rollout_prompts: int = Field(32, ge=1, description="prompts sampled per iteration")
    samples_per_prompt: int = Field(1, ge=1, description="K completions per prompt (rloo and grpo need K >= 2)")
    advantage: Literal["gae", "rloo", "grpo"] = Field(
        "gae", description="gae: a critic; rloo, grpo: critic-free baselines over the K samples of a prompt")
    epochs: int = Field(2, ge=1, description="passes over each rollout batch")
    clip: float = Field(0.2, gt=0, description="policy ratio clip epsilon")
    value_clip: float = Field(0.2, gt=0, description="critic value clip around the rollout's values")
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    kl_coef: float = Field(0.05, ge=0, description="the KL penalty's coefficient (initial one when adaptive)")
    kl_target: float | None = Field(None, gt=0, description="nats per sequence; set: the adaptive controller")
    kl_horizon: int = Field(10000, ge=1, description="adaptive controller horizon (samples)")
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    whiten_advantages: bool = True
    reward_clip: float | None = Field(10.0, gt=0, description="clip scores to +-this; null: no clip")
    whiten_rewards: bool = Field(False, description="whiten the scores over each rollout batch")
    missing_eos_penalty: float | None = Field(
        None, ge=0, description="subtract from the score of a completion that never ended (no EOS)")
    sampling: SamplingConfig = SamplingConfig()

    @model_validator(mode="after")
    def _k_for_baselines(self) -> PPOConfig:
        if self.advantage in ("rloo", "grpo") and self.samples_per_prompt < 2:
            raise ValueError(f"advantage: {self.advantage} compares the samples of a prompt; set "
                             "samples_per_prompt: 2 or more")
        return self


class EvalConfig(Section):
    """Reward and KL on a built-in task's held-out prompts: at step 0, every `every_steps`
    steps and at the end, so each run is a curve on the reward–KL plane."""

    every_steps: int | None = Field(50, ge=1, description="null: only at step 0 and at the end")
    num_prompts: int = Field(64, ge=1)
    samples_per_prompt: int = Field(1, ge=1, description="completions per prompt: more lower the variance "
                                    "of reward and KL; errors are over prompts")
    limit_samples: int = Field(0, ge=0, description="reference samples per prompt, drawn once, for best-of-N "
                               "and the KL-regularised optimum (docs/limits.md); 0: none")
    sampling: SamplingConfig = SamplingConfig()


class RolloutConfig(Section):
    """Who samples the policy (docs/rollout.md): its own ZeRO-3 ranks through Hugging Face
    `generate` (hf), or vLLM engines as Ray actors in their own Python environment (vllm), into
    which the policy's weights are pushed after every update and checked."""

    engine: Literal["hf", "vllm"] = Field("hf", description="hf: the policy's ranks sample; vllm: vLLM engines do")
    num_engines: int = Field(1, ge=1, description="vLLM engines; each prompt batch is split across them")
    cpus_per_engine: float = Field(1, gt=0)
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine (vLLM's tensor parallelism); "
                                      "0 GPUs on a CPU cluster")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="share of each engine GPU's memory vLLM "
                                          "takes for weights and KV cache")
    cpu_kv_cache_gb: float = Field(1, gt=0, description="KV cache per engine on CPU (VLLM_CPU_KVCACHE_SPACE)")
    python: str | None = Field(None, description="the vLLM environment's python; null: $PREFOPT_VLLM_PYTHON, "
                               "else .venv-vllm/bin/python of this checkout (make vllm-env)")
    bucket_mb: float = Field(256, gt=0, description="weights gathered and sent per message of a sync")
    start_timeout_s: float = Field(600, gt=0, description="an engine that is not serving by then ends the run")
    timeout_s: float = Field(300, gt=0, description="a weight sync or a generate call that takes longer ends "
                             "the run, in one line naming the engine and the step")
    check_every: int = Field(1, ge=0, description="check the sync every N syncs (0: never): the engine's "
                             "log-probs of fixed sequences against the policy's own")
    check_sequences: int = Field(4, ge=1, description="fixed sequences (training prompts) the check scores")
    check_tolerance: float | None = Field(None, gt=0, description="largest |engine - policy| log-prob allowed; "
                                          "null: 1e-3 in float32, 0.1 in bfloat16 / float16")
    check_greedy: bool = Field(False, description="also compare greedy completions of the fixed sequences "
                               "(rollout/sync_greedy_match: 1 when every one is equal)")

    def as_role(self, on_gpus: bool) -> RoleConfig:
        """The engines as a role, for the cluster's fit checks: on_gpus (the policy has GPUs), one
        GPU per tensor-parallel rank."""
        return RoleConfig(num_workers=self.num_engines, cpus_per_worker=self.cpus_per_engine,
                          gpus_per_worker=self.tensor_parallel_size if on_gpus else 0)


class RunConfig(Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    policy: PolicyConfig = PolicyConfig()
    ref: RefConfig = RefConfig()
    cluster: ClusterConfig = ClusterConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    eval: EvalConfig = EvalConfig()
    reward: RewardConfig = RewardConfig()
    generate: GenerateConfig = GenerateConfig()
    label: LabelConfig = LabelConfig()
    ppo: PPOConfig = PPOConfig()
    critic: CriticConfig = CriticConfig()
    rest: RestConfig = RestConfig()
    iterative: IterativeConfig = IterativeConfig()
    rollout: RolloutConfig = RolloutConfig()
    output_dir: str = Field("runs/default", description="a local path, or s3://, gs://, hdfs:// (docs/storage.md)")

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, tree: Any) -> Any:
        # Keys that moved when each model role got its own section: name the new key.
        if not isinstance(tree, dict):
            return tree
        moved = []
        for (section, key), new in MOVED_KEYS.items():
            node = tree.get(section)
            if isinstance(node, dict) and (key in node if key else True):
                moved.append(f"{section}.{key} moved to {new}" if key else f"section {section} moved to {new}")
        if moved:
            raise ValueError("; ".join(moved))
        return tree

    @model_validator(mode="after")
    def _sections_agree(self) -> RunConfig:
        # Rules that span sections, checked at load, before anything starts.
        if self.data.path is None and self.data.task is None:
            raise ValueError("set data.path (a file) or data.task (a built-in task)")
        name, params = self.algorithm.name, self.algorithm.loss_params()
        if name in ROUND_ALGORITHMS:
            self._check_rounds()
            name = self.loss_name
        if name in ONLINE_ALGORITHMS:
            if self.data.path is None and self.data.format not in ("auto", "prompt_only"):
                raise ValueError(f"algorithm.name={name} samples its own completions of prompts; "
                                 f"use data.format: prompt_only (got {self.data.format})")
        elif self.ref.mode == "none" and needs_reference(name, **params):
            raise ValueError(f"algorithm.name={name} needs a reference model, but ref.mode is none "
                             "(use ref.mode: cache or live, or a reference-free loss: simpo, cpo, orpo, sft)")
        if self.ref.mode == "adapters_off" and self.model.lora is None:
            raise ValueError("ref.mode: adapters_off computes the reference as the policy with its LoRA adapters "
                             "switched off; set model.lora (e.g. --set model.lora.rank=16) or use ref.mode: cache")
        if self.ref.mode == "adapters_off" and self.ref.model_path is not None:
            raise ValueError(f"ref.mode: adapters_off makes the policy's base model the reference; ref.model_path "
                             f"({self.ref.model_path}) needs its own ranks: use ref.mode: cache or live")
        if self.ref.mode == "live" and self.ref.deepspeed.zero_stage == 3 and self.ref.num_workers > 1:
            raise ValueError("ref.mode=live with ref.deepspeed.zero_stage 3 on several ranks: each policy rank "
                             "asks one reference rank alone, but ZeRO-3 ranks must compute together; "
                             "use ref.num_workers: 1, ref.deepspeed.zero_stage: 0, or ref.mode: cache")
        return self

    def _check_rounds(self) -> None:
        from prefopt.losses.names import LOSSES, PAIRWISE_LOSSES

        key = ROUND_ALGORITHMS[self.algorithm.name]
        loss = self.loss_name
        allowed = PAIRWISE_LOSSES if key == "rest" else tuple(x for x in PAIRWISE_LOSSES if x != "sft")
        if loss not in allowed:
            known = "" if loss in LOSSES else " (not a loss)"
            raise ValueError(f"{key}.loss: {loss}{known}; use one of {', '.join(allowed)}")
        resolve_params(loss, **self.algorithm.loss_params())
        if self.ref.mode in ("live", "adapters_off"):
            raise ValueError(f"ref.mode: {self.ref.mode} with algorithm.name={self.algorithm.name}: each round's reference "
                             "log-probs go through the cache; use ref.mode: cache")
        if key == "rest" and any(b <= a for a, b in zip(self.rest.thresholds, self.rest.thresholds[1:], strict=False)):
            raise ValueError(f"rest.thresholds: {self.rest.thresholds} must rise from one Improve step to the next")
        if key == "rest" and not all(0 <= t < 1 for t in self.rest.thresholds):
            raise ValueError(f"rest.thresholds: {self.rest.thresholds} must lie in [0, 1) (rest.threshold_on)")
        total = self.schedule_steps
        if "max_steps" in self.train.model_fields_set and self.train.max_steps != total:
            what = ("rest.grow_steps x len(rest.thresholds) x rest.improve_steps" if key == "rest"
                    else "iterative.rounds x iterative.round_steps")
            raise ValueError(f"train.max_steps: {self.train.max_steps}, but {self.algorithm.name} trains {what} "
                             f"= {total} steps; leave train.max_steps unset")
        self.train.max_steps = total  # what every reader of max_steps (progress, the loop) sees

    @property
    def loss_name(self) -> str:
        """The loss the policy trains: algorithm.name, or a multi-round algorithm's loss."""
        key = ROUND_ALGORITHMS.get(self.algorithm.name)
        return getattr(self, key).loss if key else self.algorithm.name

    @property
    def schedule_steps(self) -> int:
        """A multi-round algorithm's optimizer steps in all (train.max_steps for it)."""
        if self.algorithm.name == "rest":
            return self.rest.grow_steps * len(self.rest.thresholds) * self.rest.improve_steps
        return self.iterative.rounds * self.iterative.round_steps

    def _beside_policy(self, role: RefConfig | RewardConfig | CriticConfig) -> RoleConfig:
        """A frozen role's ranks, with the resources it leaves unset (None) taken from the policy's."""
        def own(field: str):
            value = getattr(role, field)
            return value if value is not None else getattr(self.policy, field)

        return RoleConfig(num_workers=own("num_workers"), cpus_per_worker=own("cpus_per_worker"),
                          gpus_per_worker=own("gpus_per_worker"), micro_batch_size=own("micro_batch_size"),
                          score_batch_size=role.score_batch_size, deepspeed=role.deepspeed)

    @property
    def reward_role(self) -> RoleConfig:
        """The reward role with its unset resources taken from the policy's."""
        return self._beside_policy(self.reward)

    @property
    def critic_role(self) -> RoleConfig:
        """The critic role with its unset resources taken from the policy's."""
        return self._beside_policy(self.critic)

    @property
    def reference(self) -> RoleConfig:
        """The reference role with its unset resources taken from the policy's."""
        return self._beside_policy(self.ref)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# Keys of earlier versions -> where they live now (a clear error, not a silent default).
MOVED_KEYS = {
    ("cluster", "num_workers"): "policy.num_workers",
    ("cluster", "cpus_per_worker"): "policy.cpus_per_worker",
    ("cluster", "gpus_per_worker"): "policy.gpus_per_worker",
    ("train", "micro_batch_size"): "policy.micro_batch_size",
    ("deepspeed", None): "policy.deepspeed (and ref.deepspeed for the reference)",
    ("ref", "num_replicas"): "ref.num_workers",
    ("ref", "offload"): "ref.deepspeed.offload_param (with ref.deepspeed.zero_stage: 3)",
    ("eval", "max_new_tokens"): "eval.sampling.max_new_tokens",
    ("eval", "temperature"): "eval.sampling.temperature",
}


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
        if node.get(part) is None:  # unset, or an optional section left null (model.lora)
            node[part] = {}
        child = node[part]
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


# Names other trainers (Hugging Face TrainingArguments, TRL, DeepSpeed) give to our keys.
KEY_ALIASES = {
    "learning_rate": "lr",
    "lr_scheduler_type": "lr_schedule",
    "logging_steps": "log_steps",
    "per_device_train_batch_size": "micro_batch_size",
    "train_micro_batch_size_per_gpu": "micro_batch_size",
    "max_grad_norm": "gradient_clipping",
}


def _describe(err: dict) -> str:
    loc = tuple(err["loc"])
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(RunConfig, loc[:-1])
        # A misspelling of a name users bring from elsewhere (learning_rate) is too far from
        # ours (lr) for difflib alone: match the known aliases too, and name our key.
        names = {key: key for key in allowed}
        names.update({alias: key for alias, key in KEY_ALIASES.items() if key in allowed})
        close = difflib.get_close_matches(str(loc[-1]), names, n=1)
        hint = f"; did you mean '{names[close[0]]}'?" if close else ""
        return f"{dotted}: unknown key{hint} (allowed: {', '.join(allowed)})"
    msg = err["msg"]
    if err["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
        if not loc:  # a rule across sections names its own fields
            return msg
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

"""Offline preference training (DPO family, KTO, SFT): the controller, top to bottom.

    result = train(cfg, console)

The controller ships step numbers, never tensors: every policy rank opens the tokenized data
from its path and reads its own rows (prefopt.cluster.sharding), with their reference log-probs
from the RefCache (ref.mode=cache) or from the reference ranks (ref.mode=live). The maths of a
step lives with the workers (prefopt.workers.offline_step); the stages in prefopt.algorithms.stages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prefopt.algorithms import stages
from prefopt.config import RunConfig


@dataclass
class TrainResult:
    output_dir: str  # a local path or a store's URI (prefopt.storage)
    model_dir: str  # the exported model: output_dir/model
    final_metrics: dict[str, float]
    steps: int
    run_id: str
    timings: dict[str, float]
    param_bytes: list[int]  # parameter bytes held by each rank (its ZeRO-3 partition)


def train(cfg: RunConfig, console, *, resume: bool | None = None) -> TrainResult:
    """Run offline training end to end. resume: None = resume if a checkpoint exists."""
    from prefopt.losses import needs_reference
    from prefopt.tracking import Tracker
    from prefopt.tracking.tracker import TAG_DATA_FINGERPRINT, TAG_REFCACHE_FINGERPRINT

    timings: dict[str, float] = {}
    # The reference role answers the loss (a cache filled once, or live per micro-batch) and the
    # evaluation's KL; it never lives on a policy rank, and starts only when someone needs it.
    loss_reference = cfg.ref.mode != "none" and needs_reference(cfg.algorithm.name, **cfg.algorithm.loss_params())
    evaluating = cfg.data.task is not None
    stages.preflight(cfg, console, with_reference=loss_reference or evaluating)
    run = stages.open_run(cfg, resume)
    inputs = stages.prepare_inputs(cfg, console)
    run.check_data(inputs.data)
    check_loss_fits_data(cfg, inputs.data, console)
    stages.connect(cfg, with_reference=loss_reference or evaluating)
    reference = None

    def start_reference():
        nonlocal reference
        if reference is None:
            reference = stages.start_reference(cfg, inputs, console)
        return reference

    tags = {TAG_DATA_FINGERPRINT: inputs.data.fingerprint}
    try:
        t0 = time.perf_counter()
        ref_cache = None
        if loss_reference and cfg.ref.mode == "cache":
            from prefopt.algorithms.precompute_ref import fill_reference_cache

            ref_cache = fill_reference_cache(cfg, inputs, console, start_reference)
            tags[TAG_REFCACHE_FINGERPRINT] = ref_cache.fingerprint
            if reference is not None and not evaluating:  # its job is done: free its devices
                reference.shutdown()
                reference = None
        elif loss_reference:
            start_reference()
        timings["reference_seconds"] = time.perf_counter() - t0
        evaluator = None
        if evaluating:
            from prefopt.eval import Evaluator

            with console.status(f"sampling the reference on {cfg.eval.num_prompts} test prompts"):
                evaluator = Evaluator(cfg, inputs.tokenizer, start_reference())

        with Tracker.start(cfg, run_id=run.mlflow_run_id, tags=tags) as tracker:
            tracker.log_config()
            tracker.log_data_input(inputs.data)
            t0 = time.perf_counter()
            policy, infos = stages.start_policy(cfg, inputs, run, console, ref_cache=ref_cache, reference=reference)
            timings["startup_seconds"] = time.perf_counter() - t0
            try:
                state = {"data_fingerprint": inputs.data.fingerprint, "mlflow_run_id": tracker.run_id}
                evaluate = (lambda step: log_evaluation(evaluator, policy, step, tracker, console)) if evaluator else None
                metrics = stages.run_steps(cfg, stages.steps_on(policy), stages.saver(policy, run), run, tracker,
                                           console, state, evaluate)
                model_dir = stages.export(policy, run, console)
            finally:
                policy.shutdown()
            with console.status("logging the model to MLflow"):
                tracker.log_model_dir(model_dir)
    finally:
        if reference is not None:
            reference.shutdown()
    return TrainResult(run.output_dir, model_dir, metrics, cfg.train.max_steps, tracker.run_id, timings,
                       [info["param_bytes"] for info in infos])


def log_evaluation(evaluator, policy, step: int, tracker, console) -> dict[str, float]:
    result = evaluator(policy)
    tracker.log_metrics(result.metrics, step=step)
    tracker.log_generations(result.samples, step=step)
    m = result.metrics
    console.print(f"eval at step {step}: reward {m['eval/reward']:.3f} (reference {m['eval/reference_reward']:.3f}), "
                  f"KL to reference {m['eval/kl']:.2f} nats, win rate vs reference {m['eval/win_rate']:.2f}")
    return m


def check_loss_fits_data(cfg: RunConfig, data, console) -> None:
    """Unpaired losses need unpaired data and the other way round; warn on KTO's weight balance."""
    from prefopt.losses import is_unpaired, kto_weight_warning, resolve_params

    name = cfg.algorithm.name
    if is_unpaired(name) != (data.kind == "unpaired"):
        want = "unpaired data (data.format: unpaired)" if is_unpaired(name) else "preference pairs"
        raise stages.PreflightError(f"algorithm.name={name} trains on {want}; the data is {data.format}"
                         + ("" if is_unpaired(name) else " (use data.format: unpaired with algorithm.name: kto)"))
    if name == "kto":
        # KTO's paper advises (w_d * n_d) / (w_u * n_u) in a band; check once, on the whole data set.
        labels = data.table["label"].to_pylist()
        params = resolve_params(name, **cfg.algorithm.loss_params())
        message = kto_weight_warning(sum(labels), len(labels) - sum(labels), params["desirable_weight"],
                                     params["undesirable_weight"])
        if message:
            console.print(f"[yellow]warning:[/] {message}")

"""Offline preference training (DPO family, KTO, SFT): the controller, top to bottom.

    result = train(cfg, console)

The controller ships step numbers, never tensors: every policy rank opens the tokenized data
from its path and reads its own rows (prefopt.cluster.sharding), with their reference log-probs
from the RefCache (ref.mode=cache) or from the reference ranks (ref.mode=live). The maths of a
step lives with the workers (prefopt.workers.offline_step); the stages in prefopt.algorithms.stages.
"""

from __future__ import annotations

import time

from prefopt.algorithm_spec import loss_needs_reference
from prefopt.algorithms import stages
from prefopt.algorithms.session import Session, TrainResult
from prefopt.config import RunConfig


def train(cfg: RunConfig, console, *, resume: bool | None = None) -> TrainResult:
    """Run offline training end to end. resume: None = resume if a checkpoint exists."""
    from prefopt.algorithms.precompute_ref import fill_reference_cache
    from prefopt.tracking.tracker import TAG_REFCACHE_FINGERPRINT

    with Session.open(cfg, console, resume=resume) as s:
        check_loss_fits_data(cfg, s.inputs.data, console)
        # The reference answers the loss (a cache filled once, or live per micro-batch) and the
        # evaluation's KL; it never lives on a policy rank (but as LoRA's base model: ref.mode
        # adapters_off), and starts only when someone needs it.
        t0 = time.perf_counter()
        ref_cache, tags = None, {}
        needs_reference = loss_needs_reference(cfg)
        if needs_reference and cfg.ref.mode == "cache":
            ref_cache = fill_reference_cache(cfg, s.inputs, console, s.start_reference)
            tags[TAG_REFCACHE_FINGERPRINT] = ref_cache.fingerprint
            if cfg.data.task is None:  # its job is done: free its devices
                s.stop("reference")
        elif needs_reference and cfg.ref.mode == "live":
            s.start_reference()
        s.timings["reference_seconds"] = time.perf_counter() - t0

        with s.tracking(tags):
            live = s.groups["reference"].actors if cfg.ref.mode == "live" and needs_reference else None
            policy = s.start("policy", "setup", s.inputs.rank_model_dir(), s.inputs.rank_data_path(),
                             ref_cache=ref_cache, ref_actors=live,
                             base_reference=needs_reference and cfg.ref.mode == "adapters_off")
            evaluator = s.evaluator()  # after the policy: with adapters_off, the reference is its ranks
            metrics = s.train(stages.steps_on(policy), s.saver("policy"), s.evaluation(evaluator, policy))
            return s.finish(policy, metrics)


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

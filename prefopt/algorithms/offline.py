"""Offline preference training (DPO family, KTO, SFT): the whole algorithm in one file.

Worker side (runs inside each PolicyWorker / ReferenceWorker):
    sequence_logps_of_rows   rows -> summed completion log-probs, one forward per micro-batch
    micro_batch_loss         rows -> (loss, metrics) with prefopt.losses

Controller side (the driver):
    train(cfg)               data -> reference log-probs -> policy group -> steps -> export

The controller ships step numbers, never tensors: every worker opens the tokenized data from
its path and reads its own rows (prefopt.cluster.sharding), with their reference log-probs from
the RefCache (ref.mode=cache) or from the reference server (ref.mode=live).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from prefopt.config import RunConfig

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
# Pack a micro-batch only when that removes at least this share of padded tokens (prefopt.data.collate).
MIN_PACKING_GAIN = 0.1
# The sequences of one example, in batch order (prefopt.data.collate); also the RefCache columns.
ROLES = {"pair": ("chosen", "rejected"), "unpaired": ("completion", "kl")}


# =============================================================================== worker side


def forward_logps(model, data, indices: list[int], packing: bool) -> tuple[dict, dict]:
    """One forward over the rows' sequences -> ({role: logps [B]}, {role: lengths [B], ...}).

    Roles: pairs -> chosen, rejected; unpaired (KTO) -> completion, kl. `packing` must come
    from prefopt.models.logprobs.resolve_packing for this model.
    """
    from prefopt.data import collate
    from prefopt.models import accelerator_device
    from prefopt.models.logprobs import sequence_logps

    rows = data.rows(indices)
    batch = collate(rows, pad_token_id=data.pad_token_id, packing=packing, max_length=data.max_length,
                    min_packing_gain=MIN_PACKING_GAIN)
    batch = {k: v.to(accelerator_device(), non_blocking=True) for k, v in batch.items()}
    logps, lengths = sequence_logps(model, batch)  # [2B], [2B]
    b = len(rows)
    first, second = ROLES[data.kind]
    extra = {"desirable": batch["desirable"]} if "desirable" in batch else {}
    return ({first: logps[:b], second: logps[b:]},
            {first: lengths[:b], second: lengths[b:], "tokens": int(batch["seq_index"].ge(0).sum()), **extra})


@torch.no_grad()
def sequence_logps_of_rows(model, data, indices: list[int], packing: bool) -> dict[str, torch.Tensor]:
    """Reference side: fp32 summed log-probs of the rows, by role (what the cache stores)."""
    logps, _ = forward_logps(model, data, indices, packing)
    return {role: v.float().cpu() for role, v in logps.items()}


def micro_batch_loss(model, data, indices: list[int], cfg: RunConfig, ref: dict[str, np.ndarray] | None,
                     packing: bool):
    """-> (loss scalar, metrics {name: float}, non-padding tokens) for one micro-batch.

    ref: reference log-probs of exactly these rows, {role: [B]} (None for reference-free losses).
    """
    from prefopt.losses import pairwise_loss, unpaired_loss

    name, params = cfg.algorithm.name, cfg.algorithm.loss_params()  # the loss fills in its defaults
    logps, info = forward_logps(model, data, indices, packing)
    ref_of = (lambda role: torch.tensor(ref[role])) if ref is not None else (lambda role: None)  # a copy: live answers are read-only
    if name == "sft":
        # Mean token NLL of each chosen completion, averaged over examples: per-example means
        # keep the loss independent of how examples are split across ranks and micro-batches.
        per_example = -logps["chosen"] / info["chosen"].clamp(min=1)
        loss = per_example.mean()
        metrics = {"loss": loss.item(), "logps/chosen": logps["chosen"].mean().item()}
    elif name == "kto":
        out = unpaired_loss(name, policy_logps=logps["completion"], ref_logps=ref_of("completion"),
                            desirable=info["desirable"], kl_policy_logps=logps["kl"],
                            kl_ref_logps=ref_of("kl"), lengths=info["completion"], **params)
        loss, metrics = out.loss, out.metrics
    else:
        out = pairwise_loss(name, policy_chosen_logps=logps["chosen"], policy_rejected_logps=logps["rejected"],
                            ref_chosen_logps=ref_of("chosen"), ref_rejected_logps=ref_of("rejected"),
                            chosen_lengths=info["chosen"], rejected_lengths=info["rejected"], **params)
        loss, metrics = out.loss, out.metrics
    return loss, metrics, info["tokens"]


# =============================================================================== controller side


def needs_reference_model(cfg: RunConfig) -> bool:
    from prefopt.losses import needs_reference

    if cfg.algorithm.name == "sft":
        return False
    return needs_reference(cfg.algorithm.name, **cfg.algorithm.loss_params())


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Path
    final_metrics: dict[str, float]
    steps: int
    run_id: str
    timings: dict[str, float]
    param_bytes: list[int]  # parameter bytes held by each rank (its ZeRO-3 partition)


def _latest_checkpoint(output_dir: Path) -> tuple[str, dict] | None:
    """The newest complete checkpoint (one with a state file), ignoring any half-written one."""
    complete = []
    for state_file in (output_dir / CHECKPOINTS).glob(f"step*/{STATE_FILE}"):
        state = json.loads(state_file.read_text())
        complete.append((state["step"], state_file.parent.name, state))
    if not complete:
        return None
    _, tag, state = max(complete)
    return tag, state


def mean_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    """Average metrics over micro-batches or ranks. A metric some parts lack (KTO's
    rewards/chosen in a batch without desirable examples) is averaged over the parts that have it."""
    keys = dict.fromkeys(k for part in parts for k in part)
    return {k: float(np.mean([part[k] for part in parts if k in part])) for k in keys}


def _combine_ranks(per_rank: list[dict[str, float]]) -> dict[str, float]:
    out = mean_metrics(per_rank)
    out["tokens"] = float(sum(m["tokens"] for m in per_rank))
    out["step_seconds"] = max(m["step_seconds"] for m in per_rank)
    return out


def train(cfg: RunConfig, console, *, resume: bool | None = None) -> TrainResult:
    """Run offline training end to end. resume: None = resume if a checkpoint exists."""
    from transformers import AutoTokenizer

    from prefopt.algorithms.precompute_ref import precompute
    from prefopt.cluster.ray_setup import connect
    from prefopt.cluster.worker_group import WorkerGroup
    from prefopt.data import prepare
    from prefopt.models import ensure_model
    from prefopt.tracking import Tracker
    from prefopt.tracking.tracker import TAG_DATA_FINGERPRINT, TAG_REFCACHE_FINGERPRINT
    from prefopt.workers.policy import PolicyWorker
    from prefopt.workers.reference import ReferenceServer

    timings: dict[str, float] = {}
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = _latest_checkpoint(output_dir)
    if resume is True and checkpoint is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {output_dir / CHECKPOINTS}")
    if resume is False and checkpoint is not None:
        shutil.rmtree(output_dir / CHECKPOINTS)
        checkpoint = None
    if checkpoint is None:
        (output_dir / "metrics.jsonl").unlink(missing_ok=True)
    (output_dir / "config.yaml").write_text(cfg.to_yaml())

    with console.status("model and tokenizer"):
        model_dir = ensure_model(cfg.model, output_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with console.status("reading, validating and tokenizing the data"):
        data = prepare(cfg, tokenizer, output_dir / "data")
    console.print(f"data: {data.report.summary()}  [dim]fingerprint {data.fingerprint[:16]}[/]")
    if checkpoint is not None and checkpoint[1].get("data_fingerprint") not in (None, data.fingerprint):
        raise ValueError(f"{output_dir / CHECKPOINTS / checkpoint[0]}: the checkpoint was trained on other "
                         f"data (fingerprint {checkpoint[1]['data_fingerprint'][:16]}, now "
                         f"{data.fingerprint[:16]}); use --fresh or another output_dir")

    if cfg.algorithm.name == "kto":
        _warn_kto_balance(cfg, data, console)
    elif data.kind != "pair":
        raise ValueError(f"algorithm.name={cfg.algorithm.name} trains on preference pairs; the data is "
                         f"{data.format} (use data.format: unpaired with algorithm.name: kto)")

    connect(cfg.cluster, reference_replicas=cfg.ref.num_replicas)
    # The reference, for losses that need one: a filled cache (the default), or a server that
    # answers per micro-batch (ref.mode=live). Either way it never lives on a policy rank.
    ref_cache, ref_server, tags = None, None, {TAG_DATA_FINGERPRINT: data.fingerprint}
    if needs_reference_model(cfg):
        if cfg.ref.mode == "none":
            raise ValueError(f"algorithm.name={cfg.algorithm.name} needs a reference model, but ref.mode is none")
        t0 = time.perf_counter()
        if cfg.ref.mode == "cache":
            ref_cache = precompute(cfg, model_dir, tokenizer, data, console)
            tags[TAG_REFCACHE_FINGERPRINT] = ref_cache.fingerprint
        else:
            ref_server = ReferenceServer(cfg, model_dir, data)
        timings["reference_seconds"] = time.perf_counter() - t0

    with Tracker.start(cfg, run_id=checkpoint[1].get("mlflow_run_id") if checkpoint else None,
                       tags=tags) as tracker:
        tracker.log_config()
        t0 = time.perf_counter()
        with console.status(f"starting {cfg.cluster.num_workers} policy worker(s)"):
            group = WorkerGroup(PolicyWorker, cfg.cluster, name="policy", init_args=(cfg.model_dump_json(),))
        try:
            infos = group.call("setup", model_dir=str(model_dir), data_path=str(data.path), ref_cache=ref_cache,
                               ref_actors=ref_server.actors if ref_server else None)
            timings["startup_seconds"] = time.perf_counter() - t0
            stage = infos[0]["zero_stage"]
            asked = "" if stage == cfg.deepspeed.zero_stage else f" ({cfg.deepspeed.zero_stage} asked: one rank has nothing to partition)"
            console.print(f"policy: {group.size} rank(s), ZeRO stage {stage}{asked}, "
                          f"{infos[0]['param_bytes'] / 2**20:.2f} MiB of parameters on rank 0")
            start_step = 0
            if checkpoint is not None:
                tag, state = checkpoint
                group.call("load_checkpoint", str(output_dir / CHECKPOINTS), tag)
                start_step = state["step"]
                _truncate_metrics(output_dir / "metrics.jsonl", start_step)
                console.print(f"resumed from {output_dir / CHECKPOINTS / tag} at step {start_step}")
            state = {"data_fingerprint": data.fingerprint, "mlflow_run_id": tracker.run_id}
            metrics = _loop(cfg, group, start_step, output_dir, console, tracker, state)
            export_dir = output_dir / "model"
            with console.status("exporting the policy"):
                group.call("export", str(export_dir), str(model_dir))
        finally:
            group.shutdown()
            if ref_server is not None:
                ref_server.shutdown()
        console.print(f"exported policy to [bold]{export_dir}[/]")
        if cfg.data.task is not None:
            metrics |= _evaluate(cfg, export_dir, model_dir, tracker, console)
        with console.status("logging the model to MLflow"):
            tracker.log_model_dir(export_dir)
    return TrainResult(output_dir, export_dir, metrics, cfg.train.max_steps, tracker.run_id, timings,
                       [info["param_bytes"] for info in infos])


def _warn_kto_balance(cfg: RunConfig, data, console) -> None:
    """KTO's paper advises (w_d * n_d) / (w_u * n_u) in a band; check once, on the whole data set."""
    from prefopt.losses import kto_weight_warning, resolve_params

    if data.kind != "unpaired":
        raise ValueError(f"algorithm.name=kto needs unpaired data (data.format: unpaired), not {data.format}")
    labels = data.table["label"].to_pylist()
    params = resolve_params("kto", **cfg.algorithm.loss_params())
    message = kto_weight_warning(sum(labels), len(labels) - sum(labels), params["desirable_weight"],
                                 params["undesirable_weight"])
    if message:
        console.print(f"[yellow]warning:[/] {message}")


def _evaluate(cfg: RunConfig, policy_dir: Path, reference_dir: Path, tracker, console) -> dict[str, float]:
    """Reward and KL of the final policy on the task's test prompts; the reference is the KL-0 point."""
    from prefopt.eval import evaluate

    with console.status(f"evaluating on {cfg.eval.num_prompts} test prompts"):
        result = evaluate(policy_dir, reference_dir, cfg)
    tracker.log_metrics({"eval/kl": 0.0, "eval/reward": result.metrics["eval/reference_reward"]}, step=0)
    tracker.log_metrics(result.metrics, step=cfg.train.max_steps)
    tracker.log_generations(result.samples, step=cfg.train.max_steps)
    m = result.metrics
    console.print(f"eval: reward {m['eval/reward']:.3f} (reference {m['eval/reference_reward']:.3f}), "
                  f"KL to reference {m['eval/kl']:.2f} nats, win rate vs reference {m['eval/win_rate']:.2f}")
    return m


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after the checkpoint we resume from: those steps run again."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def _loop(cfg: RunConfig, group, start_step: int, output_dir: Path, console, tracker, state: dict
          ) -> dict[str, float]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    metrics: dict[str, float] = {}
    columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=console) as progress, (output_dir / "metrics.jsonl").open("a") as log_file:
        task = progress.add_task("train", total=cfg.train.max_steps, completed=start_step, info="")
        for step in range(start_step, cfg.train.max_steps):
            t0 = time.perf_counter()
            metrics = _combine_ranks(group.call("train_step", step))
            metrics["tokens_per_second"] = metrics["tokens"] / max(time.perf_counter() - t0, 1e-9)
            done = step + 1
            log_file.write(json.dumps({"step": done, **metrics}) + "\n")
            log_file.flush()
            if done % cfg.train.log_steps == 0 or done == cfg.train.max_steps:
                tracker.log_metrics(metrics, step=done)
            acc = metrics.get("rewards/accuracies")
            info = f"loss {metrics['loss']:.4f}" + (f"  acc {acc:.2f}" if acc is not None else "")
            progress.update(task, advance=1, info=info + f"  {metrics['tokens_per_second']:.0f} tok/s")
            if done % cfg.train.save_steps == 0 or done == cfg.train.max_steps:
                _save(group, output_dir, done, state)
    return metrics


def _save(group, output_dir: Path, step: int, state: dict) -> None:
    tag = f"step{step}"
    directory = output_dir / CHECKPOINTS
    group.call("save_checkpoint", str(directory), tag, {"step": step})
    # Written after every rank has saved: a state file means the checkpoint is complete.
    (directory / tag / STATE_FILE).write_text(json.dumps({"step": step, **state}))

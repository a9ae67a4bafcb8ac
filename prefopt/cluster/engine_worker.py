"""EngineWorker: one rank of one model role, holding one DeepSpeed engine.

Every model prefopt runs (policy, reference; critic and reward next) is an EngineWorker in a
WorkerGroup. The worker joins its group's process group, builds its model (a causal LM, or a
causal LM with a scalar head for critics and reward models), wraps it in a DeepSpeed engine
for training (optimizer, ZeRO-3) or for inference (frozen; ZeRO-3 with parameter offload when
asked), and can generate, score sequences, save, load and export. Roles (prefopt.workers) are
thin layers that add what only they do: the policy's training steps, the reference's cache rows.

Under ZeRO-3 every rank holds a slice of each parameter and every forward is a collective:
all ranks of a group must run the same forwards together (WorkerGroup.split sees to it).
"""

from __future__ import annotations

import math
import random
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from prefopt.config import RunConfig
from prefopt.errors import UserError
from prefopt.models import DTYPES, accelerator_device, quiet_transformers

Head = Literal["lm", "scalar"]


def lr_lambda(schedule: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def param_bytes(module: torch.nn.Module, trainable_only: bool = False) -> int:
    """Parameter bytes this rank holds: its ZeRO-3 partition, or the full tensors; trainable_only:
    only those the optimizer steps (all of them, or LoRA's adapters)."""
    total = 0
    for p in module.parameters():
        if p.requires_grad or not trainable_only:
            local = getattr(p, "ds_tensor", p)
            total += local.numel() * local.element_size()
    return total


def has_scalar_head(model_dir: str) -> bool:
    """Whether the directory holds a trained ...ForSequenceClassification (a reward model)."""
    import json

    from prefopt.models import model_dir as checks

    return checks.has_scalar_head(json.loads((Path(model_dir) / "config.json").read_text()))


def load_model(model_dir: str, head: Head, dtype: torch.dtype):
    """A causal LM, or the same body with a one-output linear head (the base model's
    ...ForSequenceClassification class, so a trained critic or reward model loads with plain
    transformers)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if head == "lm":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=dtype, num_labels=1)
        if model.config.pad_token_id is None:  # it finds each row's last token through the pad id
            model.config.pad_token_id = model.config.eos_token_id
        if not has_scalar_head(model_dir):
            # A new head starts at zero (every score 0), the same on any number of ranks: a random
            # one would be drawn differently when ZeRO-3 partitions it at creation. Before the
            # engine exists, so the optimizer's own copy of the weights starts at zero too.
            import deepspeed

            with deepspeed.zero.GatheredParameters([model.score.weight], modifier_rank=0), torch.no_grad():
                model.score.weight.zero_()
    model.config.use_cache = False  # training and scoring forwards; generate() asks for the cache
    return model


class EngineWorker:
    """Base of every role's Ray actor. `role` names its config section: "policy", "ref", "reward" or "critic"."""

    def __init__(self, config_json: str, role: str = "policy"):
        self.cfg = RunConfig.model_validate_json(config_json)
        self.role = {"policy": self.cfg.policy, "ref": self.cfg.reference, "reward": self.cfg.reward_role,
                     "critic": self.cfg.critic_role}[role]
        self.rank, self.world_size = 0, 1
        quiet_transformers()
        # DeepSpeed 0.19 still calls collectives that torch 2.13 deprecates, once per step.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated")
        torch.set_num_threads(max(1, int(self.role.cpus_per_worker)))
        # Gradients that underflow to denormal floats (a saturated DPO sigmoid late in training)
        # make CPU arithmetic ~100x slower; flushing them to zero changes nothing a loss can see.
        # Set before the first parallel region, so the OpenMP threads inherit it.
        torch.set_flush_denormal(True)

    # ------------------------------------------------------------------ placement

    def node_address(self) -> tuple[str, str]:
        import ray

        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    def pick_port(self) -> int:
        from prefopt.cluster.worker_group import free_port

        return free_port()

    def join_process_group(self, *, master_addr: str, master_port: int, rank: int, world_size: int,
                           local_rank: int, backend: str, timeout_s: int) -> None:
        import datetime
        import os

        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
        import deepspeed

        if torch.cuda.device_count() > 1:  # Ray shows each actor its own GPU; elsewhere pick ours
            torch.cuda.set_device(local_rank)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
        self.rank, self.world_size = rank, world_size

    # ------------------------------------------------------------------ the engine

    def build(self, model_dir: str, *, train: bool, head: Head = "lm", schedule: dict | None = None) -> dict:
        """Load the model into a DeepSpeed engine: with an optimizer and LR schedule (train) or frozen.

        schedule: train-section fields that differ for this engine (PPO: each role's lr, the
        micro-batches per optimizer step, the optimizer steps in the run)."""
        import deepspeed
        from transformers import AutoTokenizer
        from transformers.integrations import HfDeepSpeedConfig

        from prefopt.cluster.deepspeed_config import deepspeed_config

        cfg = self.cfg
        if cfg.model.dtype == "bfloat16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise UserError(f"model.dtype: bfloat16 is not supported by {torch.cuda.get_device_name()} "
                            "(it needs compute capability 8.0 or newer); use float16 or float32")
        from prefopt.storage import localize

        model_dir = str(localize(model_dir))  # a store's URI: downloaded once per node
        torch.manual_seed(cfg.train.seed)
        t = cfg.train.model_copy(update=schedule or {})
        ds_config = deepspeed_config(self.role, dtype=cfg.model.dtype, world_size=self.world_size,
                                     train=t if train else None)
        self.zero_stage = ds_config["zero_optimization"]["stage"]
        # While this object lives, from_pretrained builds the model under deepspeed.zero.Init,
        # so with ZeRO-3 no rank ever materialises the full model.
        self._hf_ds_config = HfDeepSpeedConfig(ds_config) if self.zero_stage == 3 else None
        model = load_model(model_dir, head, DTYPES[cfg.model.dtype])
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.head, self.model_dir = head, model_dir
        # A trained role trains LoRA adapters when model.lora is set; a frozen one stays the base model.
        self.lora = cfg.model.lora if train else None
        if self.lora is not None:
            from prefopt.models.lora import add_adapters

            model = add_adapters(model, self.lora, head)
        if train:
            # Only what trains: with LoRA the frozen base has no gradients and no optimizer state.
            trained = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(trained, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay)
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lr_lambda(t.lr_schedule, t.warmup_steps, t.max_steps))
            self.engine, _, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        elif self.zero_stage == 3:
            model.requires_grad_(False)
            self.engine = deepspeed.initialize(model=model, config=ds_config)[0]
        else:
            # A frozen copy per rank needs no engine: nothing to partition or optimise.
            self.engine = model.requires_grad_(False).to(accelerator_device())
        self.model = getattr(self.engine, "module", self.engine)  # the Hugging Face model (peft's, with LoRA)
        self.model.train(train)
        return {"rank": self.rank, "param_bytes": param_bytes(self.model), "zero_stage": self.zero_stage,
                "trainable_param_bytes": param_bytes(self.model, trainable_only=True)}

    def memory(self) -> dict[str, int]:
        """What this rank holds, in bytes: its parameters (the ZeRO-3 partition, or all of them),
        the part of them that trains, and the optimizer's state (Adam's moments, and the fp32
        copy ZeRO steps when it keeps one). Read after a step, when the state exists."""
        def nbytes(tensors) -> int:
            return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t) and t.dim() > 0)

        optimizer = getattr(self.engine, "optimizer", None)
        base = getattr(optimizer, "optimizer", optimizer)  # ZeRO and bf16 wrap the torch optimizer
        # Keyed by what it steps; ZeRO-3 empties its param_groups between steps, so read the state itself.
        state = sum(nbytes(v.values()) for v in base.state.values()) if isinstance(base, torch.optim.Optimizer) else 0
        for copy in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
            state += nbytes(getattr(optimizer, copy, None) or [])  # ZeRO-3, ZeRO-1/2, bf16: the fp32 master copy
        return {"param_bytes": param_bytes(self.model), "trainable_param_bytes": param_bytes(self.model, trainable_only=True),
                "optimizer_state_bytes": state}

    def _adapters(self, on: bool):
        """on: the model as trained; off: its base model (LoRA's reference). A model without adapters is its base."""
        from prefopt.models.lora import adapters_off

        return nullcontext() if on else adapters_off(self.model)

    # ------------------------------------------------------------------ generation and scoring

    def generate(self, prompts: list[list[int]], sampling: dict, seed: int, adapters: bool = True) -> list[dict]:
        """Sample a completion for each prompt (token ids): [{completion_ids, logprobs, text}].
        adapters=False: the base model's samples (LoRA's reference on the policy's ranks).

        Under ZeRO-3 the parameters are gathered once for the whole call (and the per-module
        gather hooks lifted), not once per token; all ranks of the group must call together.
        The RNG is forked: sampling never changes the training RNG, so resume stays exact.
        """
        from prefopt.models.generation import generate

        was_training = self.model.training
        self.model.eval()
        try:
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            with self._gathered_for_generation(), torch.random.fork_rng(devices=devices), self._adapters(adapters):
                torch.manual_seed(seed * 1_000_003 + self.rank)
                return generate(self.model, self.tokenizer, prompts, **sampling)
        finally:
            self.model.train(was_training)

    def _gathered_for_generation(self):
        if self.zero_stage != 3:
            return nullcontext()
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        return unwrap_model_for_generation(self.engine)

    def last_token_scalar(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A scalar head's output at each row's last real token of a right-padded batch
        (prefopt.data.collate.pad): the reward of a reward model. [N] fp32; keeps the graph."""
        model = self._transformers_model()
        hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  position_ids=batch["position_ids"], use_cache=False).last_hidden_state
        last = batch["attention_mask"].sum(-1) - 1  # right padding: each row's last real token
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return model.score(hidden[rows, last]).squeeze(-1).float()

    def _transformers_model(self):
        from prefopt.models.lora import transformers_model

        return transformers_model(self.model)

    def completion_values(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A scalar head's output at the K positions that predict a completion token (the value of
        the state before each token), [K] fp32 in mask order; keeps the graph (PPO's critic)."""
        model = self._transformers_model()
        hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  position_ids=batch["position_ids"], use_cache=False).last_hidden_state
        return model.score(hidden[batch["loss_mask"]]).squeeze(-1).float()

    @torch.no_grad()
    def score(self, samples: list[dict], adapters: bool = True) -> list[list[float]]:
        """Per-token scores of given completions: samples [{prompt_ids, completion_ids}] -> for
        each, one fp32 number per completion token. A causal LM gives the log-prob of each token
        (KL estimates, PPO's ratios); a scalar head gives the value of the state before each
        token (a critic; a reward model reads the last one). adapters=False: the base model's."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self._adapters(adapters):
                return self._score(samples)
        finally:
            self.model.train(was_training)

    def _score(self, samples: list[dict]) -> list[list[float]]:
        from prefopt.data.collate import pad
        from prefopt.data.tokenize import pad_token_id
        from prefopt.models.logprobs import token_logps

        step = self.role.score_batch  # no backward: may be more rows than a training micro-batch
        out: list[list[float]] = []
        for s in range(0, len(samples), step):
            part = samples[s : s + step]
            batch = pad([x["prompt_ids"] for x in part], [x["completion_ids"] for x in part],
                        pad_token_id=pad_token_id(self.tokenizer))
            batch = {k: v.to(accelerator_device()) for k, v in batch.items()}
            if self.head == "lm":
                per_token = token_logps(self.model, batch)  # [B, T], 0 off the completion
                per_token, mask = per_token.cpu(), batch["loss_mask"].cpu()  # one device sync per micro-batch
                out += [per_token[i][mask[i]].tolist() for i in range(len(part))]
            else:
                flat = self.completion_values(batch).cpu().tolist()  # [K], row by row
                at = 0
                for n in batch["lengths"].tolist():
                    out.append(flat[at : at + n])
                    at += n
        return out

    # ------------------------------------------------------------------ weight sync (rollout.engine: vllm)

    def push_weights(self, engines: list | None, bucket_bytes: int, timeout_s: float, step: int) -> dict[str, float]:
        """Send the model's weights to vLLM engines (prefopt.rollout): every rank gathers each
        bucket of parameters together (a ZeRO-3 collective), rank 0 sends it to every engine and
        the engines reload once all have arrived. `engines` on rank 0, None elsewhere. Bounded by
        `timeout_s` on rank 0: an engine that does not take a bucket in time ends the sync in one
        line. -> {seconds, bytes} on rank 0."""
        import time

        from prefopt.rollout.weights import plain_weights, weight_units

        t0 = time.perf_counter()
        deadline = t0 + timeout_s
        model = self._transformers_model()
        sent, in_flight, bucket, size = 0, [], [], 0

        def flush() -> None:
            nonlocal sent, in_flight, bucket, size
            with self._gathered([p for unit in bucket for _, p in unit]):
                if engines is not None:
                    named = [pair for unit in bucket for pair in plain_weights(model, unit)]
                    sent += sum(t.numel() * t.element_size() for _, t in named)
                    # One bucket travels while the next is gathered; never more, so rank 0 holds two at most.
                    self._wait_engines(in_flight, deadline, timeout_s, step, "weight sync")
                    in_flight = [engine.receive.remote(named) for engine in engines]
            bucket, size = [], 0

        for unit in weight_units(model):
            bucket.append(unit)
            size += sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for _, p in unit)
            if size >= bucket_bytes:
                flush()
        if bucket:
            flush()
        if engines is None:
            return {}
        self._wait_engines(in_flight, deadline, timeout_s, step, "weight sync")
        self._wait_engines([engine.commit.remote() for engine in engines], deadline, timeout_s, step, "weight reload")
        return {"seconds": time.perf_counter() - t0, "bytes": float(sent)}

    def _gathered(self, params: list):
        if self.zero_stage != 3:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)

    @staticmethod
    def _wait_engines(refs: list, deadline: float, timeout_s: float, step: int, what: str) -> None:
        import time

        import ray

        from prefopt.cluster.worker_group import ClusterError

        try:
            ray.get(refs, timeout=max(0.0, deadline - time.perf_counter()))
        except ray.exceptions.GetTimeoutError:
            raise ClusterError(f"rollout: the {what} at step {step} did not finish within rollout.timeout_s="
                               f"{timeout_s:g}s (an engine is stuck or gone); resume the run, and raise "
                               "rollout.timeout_s if the model is large") from None
        except ray.exceptions.RayActorError as exc:
            raise ClusterError(f"rollout: a vLLM engine died during the {what} at step {step}: "
                               f"{str(exc).splitlines()[0]}; resume the run (a fresh engine starts)") from None

    # ------------------------------------------------------------------ checkpoints and export

    def save_checkpoint(self, directory: str, tag: str, client_state: dict) -> list[tuple[str, int, str]]:
        """Save this rank's part of checkpoint `directory/tag` (a local path or a store's URI).
        -> (name in the tag's folder, size, sha256) of each file this rank wrote, for the
        checkpoint's state file: hashed from local disk before the upload, never downloaded again."""
        from prefopt.storage import files_written, saving_to

        with saving_to(directory, tag) as local:
            # With LoRA the frozen base is the model directory's, unchanged: only adapters (and
            # anything trained fully) and their optimizer state are saved.
            self.engine.save_checkpoint(local, tag=tag, client_state=client_state,
                                        exclude_frozen_parameters=self.lora is not None)
            rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state()
            torch.save(rng, Path(local) / tag / f"rng_rank{self.rank}.pt")
            return files_written(Path(local) / tag, self.rank)

    def load_checkpoint(self, directory: str, tag: str) -> dict:
        """Load this rank's part of checkpoint `directory/tag`, whose files the driver verified
        before any group started (prefopt.algorithms.checkpoints). -> the client state."""
        from prefopt.storage import loading_from

        with loading_from(directory, tag, self.rank) as local:
            _, client_state = self.engine.load_checkpoint(local, tag=tag, load_module_strict=self.lora is None)
            rng = torch.load(Path(local) / tag / f"rng_rank{self.rank}.pt", weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        return client_state or {}

    def gathered_state_dict(self, trainable_only: bool = False) -> dict | None:
        """The model's state dict on rank 0 (None elsewhere): every tensor, or only the parameters
        that train (LoRA's adapters: no gather of the frozen base). Under ZeRO-3 every rank must call."""
        if self.zero_stage == 3:  # gathered on rank 0
            state_dict = self.engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=trainable_only)
        elif trainable_only:
            state_dict = {name: p.detach() for name, p in self.model.named_parameters() if p.requires_grad}
        else:
            state_dict = self.model.state_dict()
        return state_dict if self.rank == 0 else None

    def export(self, out_dir: str, merged_dir: str | None = None) -> None:
        """Save the model as a plain Hugging Face directory (ZeRO-3 shards gathered on rank 0).
        With LoRA, out_dir gets peft's adapter directory, and merged_dir (when given) the base model
        with the adapters merged in, loadable with plain transformers."""
        state_dict = self.gathered_state_dict(trainable_only=self.lora is not None)
        if self.rank != 0:
            return
        from prefopt.storage import writing_dir

        if self.lora is None:
            with writing_dir(out_dir) as local:
                self.model.save_pretrained(local, state_dict=state_dict)
                self.tokenizer.save_pretrained(local)
            return
        from prefopt.models.lora import fully_trained, merge_adapter, outside_zero3, save_adapter

        with writing_dir(out_dir) as adapter:
            save_adapter(self.model, state_dict, adapter, fully_trained(self.lora, self.head))
            self.tokenizer.save_pretrained(adapter)
            if merged_dir is not None:
                with outside_zero3():
                    base = load_model(self.model_dir, self.head, DTYPES[self.cfg.model.dtype])
                with writing_dir(merged_dir) as merged:
                    merge_adapter(base, adapter, merged)
                    self.tokenizer.save_pretrained(merged)

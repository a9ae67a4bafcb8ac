"""PPO throughput: prefopt's PPO vs TRL's PPOTrainer, rollout plus update, in one run.

    .venv/bin/python benchmarks/ppo_throughput.py            # the default: 3 warm-up + 10 measured iterations
    .venv/bin/python benchmarks/ppo_throughput.py --setup    # only install the TRL that has a PPO trainer
    .venv/bin/python benchmarks/ppo_throughput.py --warmup 1 --iterations 3   # a quick look

Which TRL. The project's TRL (1.16, the dev extra) has no PPO trainer any more; the last
release that has one (trl.experimental.ppo.PPOTrainer) is 1.12.0, which imports and runs with
the transformers, accelerate and torch of this virtualenv. On first use the benchmark installs
it, without dependencies, into its own directory (--trl-dir, default
~/.cache/prefopt-bench/trl-1.12.0; `--setup` does only that step), and runs TRL in a child
process with that directory first on sys.path: the virtualenv keeps its TRL 1.16.

What both systems get, and how it is aligned:
- model: the same tiny Llama (prefopt.models.save_tiny; 4 layers, 256 wide by default) as the
  policy and the reference; a reward model built from it (LlamaForSequenceClassification,
  one label, a seeded random head) as the reward and as the critic's starting point.
- prompts: the built-in task's (imdb_sentiment) prompt_only rows, tokenized once by prefopt's
  data pipeline; TRL gets those token ids (left-padded, as its PPO generation needs).
- one PPO iteration: `--prompts` prompts, one completion each, sampled at temperature 1 with
  no top-k/top-p cut, at most `--max-new-tokens` new tokens. Stop rule, the same for both: a
  completion ends at its first EOS (kept) or after max_new_tokens (prefopt's only rule; TRL
  with stop_token="eos"). Batched generation runs until every row has ended, so compute is
  the same either way; the tokens counted are each completion's tokens up to its EOS.
- the update: `--epochs` passes over the rollout batch, cut into `--minibatches` minibatches,
  one optimizer step per minibatch, micro-batches of `--micro` sequences (prefopt:
  policy/critic micro_batch_size and train.gradient_accumulation_steps; TRL:
  per_device_train_batch_size, gradient_accumulation_steps and num_mini_batches; with more
  than one minibatch TRL's accelerator would step only once per rollout batch, so its
  accumulation is set to one minibatch's micro-batches). GAE with a critic, k1 KL penalty
  (coefficient 0.05), whitened advantages, the same learning rate for policy and critic.
- rollout forwards: TRL runs its reference, value and reward forwards in batches of
  local_rollout_forward_batch_size, set to the rollout batch (it also generates in batches of
  that size); prefopt's reference, critic and reward roles get score_batch_size = the rollout
  batch (rows per no-grad scoring forward; the critic still trains in micro-batches of `--micro`),
  and its policy generates the whole rollout batch at once.
- precision: fp32 everywhere. TRL's PPOConfig defaults to bf16=True (autocast to bf16 on CPU)
  and gradient_checkpointing=True; both are set off, and the run fails unless TRL's
  accelerator reports no mixed precision, no model has activation checkpointing on, and every
  parameter of its four models is fp32. prefopt runs with model.dtype=float32 and its policy
  rank's parameter bytes are checked (4 per parameter).
- ranks and threads: one rank each. TRL: one process, `--threads` torch threads. prefopt: its
  design, each role on its own Ray actor (policy, reference, critic, reward), each with
  `--role-threads` torch threads (cpus_per_worker; default `--threads`). prefopt's design runs
  some roles at the same time: reference, critic and reward score together (3 roles), and the
  policy and critic update together (2), so with 2 threads per role on 2 cores they are 6, then
  4, threads on 2 cores; with `--role-threads 1`, 3 then 2 (1 is prefopt's default
  cpus_per_worker). TRL's phases run one after another in its one process.
- the local Ray instance prefopt needs is started first (sized for all four roles), so both
  systems are measured with its daemons up, as in benchmarks/throughput.py.

What is timed: the first `--warmup` iterations are run and left out; the next `--iterations`
are measured. The two systems run alternately, iteration by iteration (TRL's iteration i, then
prefopt's; TRL waits in its on_step_end callback for the parent's word), so that whatever else
loads the machine during the run falls on both alike; each system's clock stops while the other
runs. TRL: an iteration is the time from its word to go to its on_step_end callback (its loop's
own work after that callback counts in the next iteration). prefopt: one call of the training
loop per iteration (train.log_steps=1); an iteration is its call plus the loop's work after it
(writing metrics.jsonl, logging to MLflow) until the loop calls again. Start-up (TRL: loading
four models and building the trainer; prefopt: starting and building the four roles' Ray actors
and DeepSpeed engines, the MLflow run; Ray itself was started before) is in no iteration; it is
printed apart. Rollout tokens/s = generated completion tokens of the measured iterations / their
summed time. prefopt's phases are its own metrics ppo/time/* (metrics.jsonl: `score` is the
concurrent phase, and its reward, reference and values rows overlap inside it); TRL's are
measured by wrapping the module-level functions its PPO loop calls (batch_generation, forward,
get_reward, truncate_response), which changes nothing they do. The 1-minute load average before
and after is printed: on a shared machine it says how much else ran.

The results start with the CPU model, core and thread counts and the library versions; the
JSON printed at the end (and written with --json) holds the same.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRL_VERSION = "1.12.0"  # the last TRL release with a PPO trainer (trl.experimental.ppo)
DEFAULT_TRL_DIR = Path(os.environ.get("PREFOPT_BENCH_TRL_DIR", Path.home() / f".cache/prefopt-bench/trl-{TRL_VERSION}"))
KL_COEF = 0.05
PREFOPT_PHASES = ("generate", "score", "reward", "reference", "values", "advantages", "update")
TRL_PHASES = ("generate", "reference", "values", "reward")


# ----------------------------------------------------------------------------- TRL with a PPO trainer


def trl_installed(trl_dir: Path) -> bool:
    return (trl_dir / f"trl-{TRL_VERSION}.dist-info").is_dir() and (trl_dir / "trl/experimental/ppo").is_dir()


def install_trl(trl_dir: Path) -> None:
    """pip install --no-deps --target trl_dir trl==TRL_VERSION: this virtualenv stays as it is."""
    trl_dir.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(trl_dir),
               f"trl=={TRL_VERSION}"]
    print(f"installing TRL {TRL_VERSION} (it has a PPO trainer) into {trl_dir}: {' '.join(command)}", flush=True)
    subprocess.run(command, check=True)
    if not trl_installed(trl_dir):
        raise RuntimeError(f"{trl_dir}: trl {TRL_VERSION} did not install with trl/experimental/ppo")


def first_eos_lengths(responses: torch.Tensor, eos: int) -> torch.Tensor:
    """Each row's tokens up to and including its first EOS (all of them without one)."""
    hit = responses == eos
    return torch.where(hit.any(1), hit.int().argmax(1) + 1, torch.full_like(hit[:, 0], responses.shape[1],
                                                                            dtype=torch.long))


def trl_worker(spec: dict) -> dict:
    """Runs in the child process whose sys.path starts with the TRL 1.12 directory."""
    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    import trl
    import trl.experimental.ppo.ppo_trainer as ppo_module
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    if trl.__version__ != TRL_VERSION:
        raise RuntimeError(f"TRL {trl.__version__} imported from {trl.__file__}, expected {TRL_VERSION}")
    import_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    f32 = torch.float32
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    tokenizer.padding_side = "left"  # TRL's PPO appends the response after the padded queries
    policy = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=f32)
    reference = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=f32)
    value = AutoModelForSequenceClassification.from_pretrained(spec["rm_dir"], dtype=f32, num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(spec["rm_dir"], dtype=f32, num_labels=1)
    prompt_ids = json.loads(Path(spec["prompts_file"]).read_text())
    rollout, micro, minibatches = spec["rollout"], spec["micro"], spec["minibatches"]
    iterations = spec["warmup"] + spec["iterations"]
    args = PPOConfig(
        output_dir=spec["output_dir"], seed=0, use_cpu=True, report_to="none", save_strategy="no",
        disable_tqdm=True, logging_steps=1, dataloader_num_workers=0,
        per_device_train_batch_size=micro, gradient_accumulation_steps=rollout // micro,
        num_mini_batches=minibatches, num_ppo_epochs=spec["epochs"], total_episodes=iterations * rollout,
        local_rollout_forward_batch_size=rollout, response_length=spec["max_new_tokens"], temperature=1.0,
        stop_token="eos", missing_eos_penalty=None, kl_coef=KL_COEF, kl_estimator="k1", whiten_rewards=False,
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, num_sample_generations=0,
        # TRL's defaults: bf16=None -> True (autocast to bf16 on CPU) and gradient_checkpointing=True
        # (transformers 5.23 reads it as activation_checkpointing). fp32 and no recomputation here.
        bf16=False, fp16=False, tf32=False, activation_checkpointing=False,
    )

    phases: dict[str, float] = dict.fromkeys(TRL_PHASES, 0.0)
    counted = {"tokens": 0}
    per_iteration: list[dict] = []
    trainer_box: dict = {}

    # The parent paces the iterations (see Lockstep): "ready" once the trainer is built, then
    # each iteration starts on its "go" and answers "done". The wait is in no iteration's time.
    to_parent = os.fdopen(spec["done_fd"], "w", buffering=1)
    from_parent = os.fdopen(spec["go_fd"], "r")

    def wait_for_go() -> None:
        if from_parent.readline().strip() != "go":
            raise RuntimeError("TRL child: the parent went away")

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            trainer = trainer_box["trainer"]
            accelerator = trainer.accelerator
            if accelerator.mixed_precision != "no" or accelerator.native_amp:
                raise RuntimeError(f"TRL: accelerator mixed_precision={accelerator.mixed_precision!r}, expected 'no'")
            for name, module in (("policy", trainer.policy_model), ("reference", trainer.ref_model),
                                 ("value", trainer.value_model), ("reward", trainer.reward_model)):
                found = {p.dtype for p in module.parameters()}
                if found != {f32}:
                    raise RuntimeError(f"TRL {name}: parameters are {sorted(map(str, found))}, expected fp32")
                if getattr(module, "is_gradient_checkpointing", False):
                    raise RuntimeError(f"TRL {name}: activation checkpointing is on")
            per_iteration.clear()
            to_parent.write("ready\n")
            wait_for_go()
            self.last, self.cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            now, cpu = time.perf_counter(), time.process_time()
            per_iteration.append({"seconds": now - self.last, "tokens": counted["tokens"],
                                  "cpu_seconds": cpu - self.cpu, **phases})
            counted["tokens"] = 0
            phases.update(dict.fromkeys(TRL_PHASES, 0.0))
            to_parent.write("done\n")
            if len(per_iteration) < iterations:
                wait_for_go()  # the loop's own work after this callback (gc.collect, ...) counts in the next
            self.last, self.cpu = time.perf_counter(), time.process_time()

    def timed(phase_of, function):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            out = function(*a, **kw)
            phase = phase_of(*a)
            if phase is not None:
                phases[phase] += time.perf_counter() - start
            return out

        return wrapper

    def count_tokens(function):
        def wrapper(stop_token_id, pad_token_id, responses):
            counted["tokens"] += int(first_eos_lengths(responses, stop_token_id).sum())
            return function(stop_token_id, pad_token_id, responses)

        return wrapper

    # The PPO loop calls these through its module's globals: wrapping them there times each
    # rollout phase without touching the loop. forward() without grad is the reference's.
    ppo_module.batch_generation = timed(lambda *a: "generate", ppo_module.batch_generation)
    ppo_module.forward = timed(lambda *a: None if torch.is_grad_enabled() else "reference", ppo_module.forward)
    ppo_module.get_reward = timed(lambda model, *a: "reward" if model is trainer_box["trainer"].reward_model
                                  else "values", ppo_module.get_reward)
    ppo_module.truncate_response = count_tokens(ppo_module.truncate_response)

    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=reference,
                         reward_model=reward, value_model=value,
                         train_dataset=Dataset.from_dict({"input_ids": prompt_ids}), callbacks=[Clock()])
    trainer_box["trainer"] = trainer
    trainer.remove_callback(PrinterCallback)
    if minibatches > 1:
        # TRL's Accelerator accumulates over per_device x gradient_accumulation_steps = the whole
        # rollout batch, so it would step once per rollout batch whatever num_mini_batches says;
        # one step per minibatch, as prefopt (and PPO) does it, needs this.
        trainer.accelerator.gradient_accumulation_steps = rollout // micro // minibatches
    setup_seconds = time.perf_counter() - t0
    trainer.train()
    if len(per_iteration) != iterations:
        raise RuntimeError(f"TRL ran {len(per_iteration)} iterations, expected {iterations}")
    return {"trl_version": trl.__version__, "trl_file": trl.__file__, "import_seconds": import_seconds,
            "setup_seconds": setup_seconds, "iterations": per_iteration}


class Lockstep:
    """TRL's PPO in a child process, one iteration at a time on the parent's word: with both
    systems measured, TRL's iteration i runs just before prefopt's, so that whatever else
    loads the machine meanwhile falls on both alike rather than on whichever ran second."""

    def __init__(self, spec: dict, trl_dir: Path, workdir: Path):
        self.out_file, self.log_file = workdir / "trl-result.json", workdir / "trl.log"
        go_read, self.go_write = os.pipe()
        self.done_read, done_write = os.pipe()
        spec_file = workdir / "trl-spec.json"
        spec_file.write_text(json.dumps(spec | {"out": str(self.out_file), "go_fd": go_read, "done_fd": done_write}))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(trl_dir), *filter(None, [os.environ.get("PYTHONPATH")])]))
        with self.log_file.open("w") as log:
            self.proc = subprocess.Popen([sys.executable, __file__, "--trl-worker", str(spec_file)], env=env,
                                         stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                         pass_fds=(go_read, done_write))
        os.close(go_read)
        os.close(done_write)
        self.go = os.fdopen(self.go_write, "w", buffering=1)
        self.done = os.fdopen(self.done_read, "r")
        self.expect("ready")  # four models loaded, trainer built, first iteration not started

    def expect(self, word: str) -> None:
        line = self.done.readline().strip()
        if line != word:
            self.fail(f"expected {word!r} from the TRL child, got {line!r}")

    def fail(self, why: str):
        code = self.proc.wait()
        sys.stderr.write(self.log_file.read_text()[-8000:])
        raise RuntimeError(f"{why} (exit {code}); its output: {self.log_file}")

    def iteration(self) -> None:
        self.go.write("go\n")
        self.expect("done")

    def result(self) -> dict:
        if self.proc.wait():
            self.fail("the TRL run failed")
        self.go.close()
        self.done.close()
        return json.loads(self.out_file.read_text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# ----------------------------------------------------------------------------- prefopt


def prefopt_config(args, model_dir: Path, rm_dir: Path, prompts_file: Path, out: Path):
    from prefopt.config import load_config

    rollout = args.prompts
    return load_config(ROOT / "configs/tiny/ppo.yaml", [
        f"model.path={model_dir}", "model.dtype=float32",
        f"data.path={prompts_file}", "data.task=null", "data.format=prompt_only",
        f"data.max_prompt_length={args.max_prompt_length}",
        f"data.max_length={args.max_prompt_length + args.max_new_tokens + 8}",
        f"output_dir={out}", "tracking.experiment=ppo-bench", "tracking.log_model=false",
        f"ppo.rollout_prompts={rollout}", "ppo.samples_per_prompt=1", "ppo.advantage=gae",
        f"ppo.epochs={args.epochs}", f"ppo.kl_coef={KL_COEF}", "ppo.kl_target=null", "ppo.kl_estimator=k1",
        "ppo.whiten_advantages=true", "ppo.whiten_rewards=false", "ppo.missing_eos_penalty=null",
        f"ppo.sampling.max_new_tokens={args.max_new_tokens}", "ppo.sampling.temperature=1.0",
        "ppo.sampling.top_k=0", "ppo.sampling.top_p=1.0", "ppo.sampling.greedy=false",
        # Every no-grad scoring forward takes the whole rollout batch, as TRL's do
        # (local_rollout_forward_batch_size); the critic trains in micro-batches of --micro.
        "reward.source=model", f"reward.model_path={rm_dir}", f"reward.score_batch_size={rollout}",
        f"critic.model_path={rm_dir}", f"critic.lr={args.lr}", f"critic.micro_batch_size={args.micro}",
        f"critic.score_batch_size={rollout}", f"ref.score_batch_size={rollout}",
        "policy.num_workers=1", f"policy.micro_batch_size={args.micro}",
        f"policy.cpus_per_worker={args.role_threads}",  # reference, critic and reward: the same (null there)
        f"train.gradient_accumulation_steps={rollout // args.minibatches // args.micro}",
        f"train.lr={args.lr}", "train.lr_schedule=constant", "train.warmup_steps=0",
        f"train.max_steps={args.warmup + args.iterations}", "train.log_steps=1", f"train.save_steps={10**6}",
        "eval.every_steps=null",
    ])


def bench_prefopt(cfg, num_params: int, before_iteration=None) -> dict:
    from rich.console import Console

    from prefopt.algorithms import ppo, stages

    # (first step, count, entry, start, end) of each call of the loop: `entry` when the loop
    # called, `start` after TRL's iteration (before_iteration) ran, `end` when the call returned.
    calls: list[tuple[int, int, float, float, float]] = []
    original = stages.run_steps

    def run_steps(cfg, steps, *a, **kw):
        def timed_steps(first: int, count: int):
            entry = time.perf_counter()
            if before_iteration is not None:
                before_iteration()
            start = time.perf_counter()
            out = steps(first, count)
            calls.append((first, count, entry, start, time.perf_counter()))
            return out

        return original(cfg, timed_steps, *a, **kw)

    stages.run_steps = run_steps
    try:
        t0 = time.perf_counter()
        result = ppo.train(cfg, Console(file=io.StringIO()), resume=False)
        total_seconds = time.perf_counter() - t0
    finally:
        stages.run_steps = original
    # The policy rank's parameter bytes tell its dtype (DeepSpeed keeps the module in it).
    bytes_per_param = result.param_bytes[0] / num_params
    if abs(bytes_per_param - 4) > 0.5:
        raise RuntimeError(f"prefopt: {bytes_per_param:.2f} bytes per parameter on the policy rank, fp32 has 4")
    if any(call[1] != 1 for call in calls):
        raise RuntimeError(f"prefopt: loop calls of {[call[1] for call in calls]} iterations; expected one each")
    logged = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    per_iteration = []
    for i, (m, (_, _, _, start, end)) in enumerate(zip(logged, calls, strict=True)):
        # The call, plus the loop's work after it (metrics.jsonl, MLflow) until it calls again.
        period = end - start + ((calls[i + 1][2] - end) if i + 1 < len(calls) else 0.0)
        per_iteration.append({"seconds": period, "tokens": m["tokens"], "step_seconds": m["step_seconds"],
                              **{p: m[f"ppo/time/{p}"] for p in PREFOPT_PHASES},
                              "policy_update": m.get("ppo/time/policy_update", float("nan")),
                              "critic_update": m.get("ppo/time/critic_update", float("nan")),
                              "response_length": m.get("ppo/response_length", float("nan"))})
    return {"startup_seconds": calls[0][2] - t0, "after_loop_seconds": total_seconds - (calls[-1][4] - t0),
            "startup_roles_seconds": result.timings.get("startup_seconds"), "iterations": per_iteration,
            "bytes_per_param": bytes_per_param}


# ----------------------------------------------------------------------------- inputs


def build_inputs(args, workdir: Path):
    """The tiny policy, a reward model made from it, the task's prompts -> (model dir, rm dir, prompts file)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from prefopt.config import DataConfig, TinyModelConfig
    from prefopt.models import save_tiny
    from prefopt.tasks import get_task

    tiny = TinyModelConfig(vocab_size=2048, hidden_size=args.width, intermediate_size=args.width * 3,
                           num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                           max_position_embeddings=1024)
    model_dir = save_tiny(workdir / "model", tiny)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    state = torch.random.get_rng_state()
    torch.manual_seed(1)  # the score head is random: a fixed one, the same for both systems
    try:
        rm = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(state)
    rm.config.pad_token_id = tokenizer.pad_token_id
    rm_dir = workdir / "reward-model"
    rm.save_pretrained(rm_dir)
    tokenizer.save_pretrained(rm_dir)
    rows = get_task("imdb_sentiment").build(DataConfig(num_examples=args.pool), "prompt_only")
    prompts_file = workdir / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    return model_dir, rm_dir, prompts_file, tokenizer


def tokenized_prompts(cfg, tokenizer, workdir: Path) -> list[list[int]]:
    """The prompts exactly as prefopt's data pipeline tokenizes them (what its policy generates from)."""
    from prefopt.data import prepare

    data = prepare(cfg, tokenizer, workdir / "tokenized")
    return data.table["prompt_ids"].to_pylist()


# ----------------------------------------------------------------------------- report


def summarise(iterations: list[dict], warmup: int) -> dict:
    measured = iterations[warmup:]
    seconds = [it["seconds"] for it in measured]
    tokens = sum(it["tokens"] for it in measured)
    keys = [k for k in measured[0] if k not in ("seconds", "tokens")]
    return {"iterations_measured": len(measured), "iteration_seconds_median": statistics.median(seconds),
            "iteration_seconds_min": min(seconds), "iteration_seconds_max": max(seconds),
            "tokens_per_iteration": tokens / len(measured), "rollout_tokens_per_second": tokens / sum(seconds),
            "phases_median": {k: statistics.median(it[k] for it in measured) for k in keys},
            "warmup_seconds": [it["seconds"] for it in iterations[:warmup]], "measured_seconds": seconds,
            "measured_tokens": [it["tokens"] for it in measured]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setup", action="store_true", help=f"only install TRL {TRL_VERSION} into --trl-dir")
    parser.add_argument("--trl-dir", type=Path, default=DEFAULT_TRL_DIR)
    parser.add_argument("--trl-worker", type=Path, help=argparse.SUPPRESS)  # the child process's entry
    parser.add_argument("--prompts", type=int, default=32, help="rollout batch: prompts per iteration, 1 sample each")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--max-prompt-length", type=int, default=48)
    parser.add_argument("--micro", type=int, default=8, help="sequences per forward/backward in the update")
    parser.add_argument("--minibatches", type=int, default=1, help="optimizer steps per epoch")
    parser.add_argument("--epochs", type=int, default=2, help="PPO epochs over each rollout batch")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--pool", type=int, default=2000, help="task prompts to draw each iteration's from")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="torch threads: TRL's (one process), and each prefopt role's unless --role-threads")
    parser.add_argument("--role-threads", type=int, help="torch threads (cpus_per_worker) of each prefopt role: "
                        "its policy and critic update at the same time, so 1 keeps prefopt within 2 cores")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--skip-prefopt", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the JSON results to this file")
    args = parser.parse_args()
    args.role_threads = args.role_threads or args.threads

    if args.trl_worker is not None:
        spec = json.loads(args.trl_worker.read_text())
        Path(spec["out"]).write_text(json.dumps(trl_worker(spec)))
        return
    if not args.skip_trl and not trl_installed(args.trl_dir):
        install_trl(args.trl_dir)  # first use (or --setup)
    if args.setup:
        print(f"TRL {TRL_VERSION} is in {args.trl_dir}")
        return
    if args.prompts % (args.minibatches * args.micro):
        parser.error("--prompts must be a multiple of --minibatches x --micro")
    if args.pool < (args.warmup + args.iterations + 1) * args.prompts:
        # TRL's dataloader must not come round within the run: on the batch that ends it,
        # accelerate steps the optimizer after every micro-batch.
        parser.error("--pool must hold (--warmup + --iterations + 1) x --prompts prompts")

    from rich.console import Console
    from rich.table import Table
    from throughput import environment, print_environment

    torch.set_num_threads(args.threads)
    console = Console()
    env = environment(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="prefopt-ppo-bench-"))
    with console.status("building the model, the reward model and the prompts"):
        model_dir, rm_dir, prompts_file, tokenizer = build_inputs(args, workdir)
        cfg = prefopt_config(args, model_dir, rm_dir, prompts_file, workdir / "prefopt")
        prompt_ids = tokenized_prompts(cfg, tokenizer, workdir)
        (workdir / "prompt_ids.json").write_text(json.dumps(prompt_ids))
        from transformers import AutoModelForCausalLM

        num_params = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).num_parameters()
    lengths = [len(p) for p in prompt_ids]
    if not args.skip_prefopt:
        # Started before either system runs (sized, as prefopt's own connect would, for all
        # four roles): both are measured with its daemons up.
        from prefopt.cluster.ray_setup import connect

        connect(cfg.cluster, [cfg.policy, cfg.reference, cfg.critic_role, cfg.reward_role])
        console.print("Ray: a local instance is up (sized for policy, reference, critic and reward) for both systems")

    results: dict[str, dict] = {}
    spec = {"model_dir": str(model_dir), "rm_dir": str(rm_dir), "prompts_file": str(workdir / "prompt_ids.json"),
            "output_dir": str(workdir / "trl"), "rollout": args.prompts, "micro": args.micro,
            "minibatches": args.minibatches, "epochs": args.epochs, "max_new_tokens": args.max_new_tokens,
            "lr": args.lr, "warmup": args.warmup, "iterations": args.iterations, "threads": args.threads}
    total = args.warmup + args.iterations
    trl = None
    load_before = os.getloadavg()[0]
    try:
        if not args.skip_trl:
            with console.status(f"TRL {TRL_VERSION}: loading the models and building the PPOTrainer"):
                trl = Lockstep(spec, args.trl_dir, workdir)
        if not args.skip_prefopt:
            both = " and TRL's PPOTrainer, iteration by iteration" if trl is not None else ""
            with console.status(f"prefopt PPO{both}: {args.warmup} + {args.iterations} iterations"):
                run = bench_prefopt(cfg, num_params, trl.iteration if trl is not None else None)
            results["prefopt"] = {**summarise(run["iterations"], args.warmup),
                                  **{k: v for k, v in run.items() if k != "iterations"}}
        elif trl is not None:
            with console.status(f"TRL's PPOTrainer: {args.warmup} + {args.iterations} iterations"):
                for _ in range(total):
                    trl.iteration()
        if trl is not None:
            trl_run = trl.result()
            results = {"trl": {**summarise(trl_run["iterations"], args.warmup),
                               "startup_seconds": trl_run["setup_seconds"], "import_seconds": trl_run["import_seconds"],
                               "version": trl_run["trl_version"], "from": trl_run["trl_file"]}} | results
    finally:
        if trl is not None:
            trl.kill()
    load = (load_before, os.getloadavg()[0])

    console.print()
    print_environment(console, env)
    if "trl" in results:
        console.print(f"TRL PPO: trl {results['trl']['version']} (trl.experimental.ppo.PPOTrainer), imported from "
                      f"{results['trl']['from']} in a child process; the virtualenv's trl {env['trl']} has no PPO")
    console.print(
        f"setup: {args.layers}x{args.width} Llama ({num_params / 1e6:.2f} M parameters), fp32 for both; "
        f"{args.prompts} prompts x 1 sample per iteration from {len(prompt_ids)} imdb_sentiment prompts "
        f"({min(lengths)}-{max(lengths)} tokens, mean {statistics.mean(lengths):.1f}); at most {args.max_new_tokens} "
        f"new tokens, ending at the first EOS for both; {args.epochs} epochs x {args.minibatches} minibatch(es) of "
        f"{args.prompts // args.minibatches}, micro-batch {args.micro}; GAE critic from the reward model; "
        f"{args.warmup} warm-up + {args.iterations} measured iterations")
    console.print(f"threads: TRL {args.threads} torch threads in its one process; prefopt {args.role_threads} in each "
                  "role's Ray actor (policy, reference, critic, reward); reference, critic and reward score together "
                  f"({3 * args.role_threads} threads then), the policy and critic update together "
                  f"({2 * args.role_threads})")

    table = Table(title=f"PPO iteration (rollout + update): median seconds, {args.iterations} measured iterations, "
                        f"{env['threads']} threads, fp32")
    for column, justify in (("system", "left"), ("iter s", "right"), ("min-max", "right"),
                            ("tok/iter", "right"), ("rollout tok/s", "right"), ("start-up s", "right")):
        table.add_column(column, justify=justify, no_wrap=True)
    labels = {"trl": "TRL PPOTrainer", "prefopt": "prefopt PPO"}
    for key, r in results.items():
        table.add_row(labels[key], f"{r['iteration_seconds_median']:.3f}",
                      f"{r['iteration_seconds_min']:.1f}-{r['iteration_seconds_max']:.1f}",
                      f"{r['tokens_per_iteration']:.1f}", f"{r['rollout_tokens_per_second']:.1f}",
                      f"{r['startup_seconds']:.1f}")
    console.print(table)

    phase_table = Table(title="where an iteration goes: median seconds per phase (share of the median iteration)")
    phase_table.caption = ("prefopt: its metrics ppo/time/* (its three scoring roles run at once: each row is the "
                           "time until that role was done); TRL: its PPO loop's functions, timed from outside, "
                           "one after another")
    phase_table.add_column("phase", no_wrap=True)
    for key in results:
        phase_table.add_column(labels[key], justify="right", no_wrap=True)

    def cell(key: str, value: float | None) -> str:
        if key not in results or value is None:
            return "-"
        return f"{value:.3f} ({value / results[key]['iteration_seconds_median']:.0%})"

    pf = results.get("prefopt", {}).get("phases_median", {})
    tr = results.get("trl", {}).get("phases_median", {})
    trl_rest = (results["trl"]["iteration_seconds_median"] - sum(tr.get(p, 0.0) for p in TRL_PHASES)) if tr else None
    rows = [("generate", pf.get("generate"), tr.get("generate")),
            ("scoring (the three below)", pf.get("score"),
             sum(tr[k] for k in ("reward", "reference", "values")) if tr else None),
            ("  reward (reward model)", pf.get("reward"), tr.get("reward")),
            ("  reference log-probs", pf.get("reference"), tr.get("reference")),
            ("  values (critic)", pf.get("values"), tr.get("values")),
            ("advantages (controller)", pf.get("advantages"), None),
            ("update (policy + critic)", pf.get("update"), None),
            ("  policy, on its rank", pf.get("policy_update"), None),
            ("  critic, on its rank", pf.get("critic_update"), None),
            ("advantages + update + rest", None, trl_rest),
            ("loop, logging (not a phase)",
             (results["prefopt"]["iteration_seconds_median"] - pf["step_seconds"]) if pf else None, None)]
    for name, p_value, t_value in rows:
        cells = {"prefopt": cell("prefopt", p_value), "trl": cell("trl", t_value)}
        phase_table.add_row(name, *[cells[k] for k in results])
    console.print(phase_table)

    ratios = {}
    if len(results) == 2:
        p, t = results["prefopt"], results["trl"]
        ratios = {"rollout_tokens_per_second": p["rollout_tokens_per_second"] / t["rollout_tokens_per_second"],
                  "iteration_seconds_median_trl_over_prefopt": t["iteration_seconds_median"]
                  / p["iteration_seconds_median"],
                  # Iteration i of both ran back to back: the ratio of each pair sees the same load.
                  "paired_tokens_per_second_median": statistics.median(
                      (pn / ps) / (tn / ts) for ps, pn, ts, tn in zip(p["measured_seconds"], p["measured_tokens"],
                                                                      t["measured_seconds"], t["measured_tokens"],
                                                                      strict=True))}
        console.print(f"prefopt / TRL rollout tokens/s: [bold]{ratios['rollout_tokens_per_second']:.2f}x[/] "
                      f"(target 1.5x); median of the {args.iterations} per-iteration ratios (each pair ran back to "
                      f"back): {ratios['paired_tokens_per_second_median']:.2f}x; TRL / prefopt median iteration "
                      f"time: {ratios['iteration_seconds_median_trl_over_prefopt']:.2f}x")
    if "prefopt" in results:
        p = results["prefopt"]
        console.print(f"start-up, not in any iteration: prefopt {p['startup_seconds']:.1f} s (Ray actors and "
                      f"DeepSpeed engines of policy, reference, critic and reward, the MLflow run; the local Ray "
                      f"itself was started before), plus {p['after_loop_seconds']:.1f} s after the loop (checkpoint, "
                      "export)" + (f"; TRL {results['trl']['startup_seconds']:.1f} s (four models loaded, trainer "
                                   f"built) after {results['trl']['import_seconds']:.1f} s of imports"
                                   if "trl" in results else ""))
    console.print(f"1-minute load average before -> after the iterations: {load[0]:.1f} -> {load[1]:.1f} "
                  f"({env['cpus_usable']} usable CPUs; the benchmark alone keeps it near "
                  f"{max(args.threads, 3 * args.role_threads)}: more means "
                  "other processes shared the CPU, and every number above is slower for it" +
                  ("; the two systems ran alternately, iteration by iteration, so both shared it alike)"
                   if len(results) == 2 else ")"))
    report = {"environment": env, "load_average_before_after": load, "trl_ppo_version": TRL_VERSION, "args": {k: str(v) for k, v in vars(args).items()},
              "num_params": num_params, "prompt_tokens": {"min": min(lengths), "max": max(lengths),
                                                          "mean": statistics.mean(lengths)},
              "results": results, "ratios": ratios, "workdir": str(workdir)}
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

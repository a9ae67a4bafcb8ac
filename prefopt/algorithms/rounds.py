"""ReST (Grow / Improve) and iterative on-policy DPO: multi-round recipes, top to bottom.

    phases = schedule(cfg)                  ReST: an Improve step per threshold after each Grow;
                                            iterative DPO: one round per Grow
    with Session.open(cfg, console) as s:
        policy = s.start("policy", ...)     samples and trains on the same ranks, never reloaded
        scorer = reward role, started once
        for phase in phases:
            grown = grow(...)               the policy's samples of the prompts, scored; a sharded
                                            data set under output_dir/rounds/grow-<g>/ (resumable,
                                            never sampled twice)
            rows = kept samples (ReST) | pairs (iterative DPO) -> tokenized data on the ranks
            reference log-probs through the cache when the loss reads them
            s.train(..., window=phase)      checkpoint and evaluation at the phase's end

A run killed anywhere resumes from its newest checkpoint: phases before it are skipped, a Grow
whose shards are all written is read back (a partly written one samples only its missing shards,
with the policy it started from: the checkpoint at the Grow's first step), and each phase's data
is rebuilt from the grown set, byte for byte. Formulas, defaults and what was measured: docs/rest.md.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from prefopt.algorithm_spec import loss_needs_reference
from prefopt.algorithms import stages
from prefopt.algorithms.session import Session, TrainResult
from prefopt.config import GenerateConfig, GrowConfig, RunConfig
from prefopt.errors import UserError


class RoundError(UserError, ValueError):
    """A round cannot go on (no sample passed a threshold, a grown set damaged after training on it)."""


@dataclass(frozen=True)
class Phase:
    """A stretch of training on one data set: a ReST Improve step, or an iterative-DPO round."""

    index: int  # 0.. over the run
    grow: int  # the Grow step whose samples it trains on
    first: int  # its optimizer steps: first..end-1
    end: int
    threshold: float | None = None  # ReST: the Improve step's threshold
    improve: int = 0  # ReST: the Improve step's number within its Grow

    @property
    def name(self) -> str:
        return f"grow {self.grow + 1}, improve {self.improve + 1}" if self.threshold is not None else \
            f"round {self.index + 1}"


def schedule(cfg: RunConfig) -> list[Phase]:
    if cfg.algorithm.name == "rest":
        r, out = cfg.rest, []
        for g in range(r.grow_steps):
            for i, tau in enumerate(r.thresholds):
                first = len(out) * r.improve_steps
                out.append(Phase(len(out), g, first, first + r.improve_steps, tau, i))
        return out
    it = cfg.iterative
    return [Phase(k, k, k * it.round_steps, (k + 1) * it.round_steps) for k in range(it.rounds)]


def grow_settings(cfg: RunConfig) -> GrowConfig:
    return cfg.rest.grow if cfg.algorithm.name == "rest" else cfg.iterative.grow


def train(cfg: RunConfig, console, *, resume: bool | None = None) -> TrainResult:
    from prefopt.algorithms.generate import read_prompts
    from prefopt.algorithms.scoring import check_reward, start_scorer

    check_reward(cfg, for_ppo=False)
    phases = schedule(cfg)
    with Session.open(cfg, console, resume=resume) as s:
        prompts = read_prompts(cfg, s.inputs.tokenizer)
        evaluator = s.evaluator()
        with s.tracking():
            policy = s.start("policy", "setup", s.inputs.rank_model_dir())
            scorer = s.own(start_scorer(cfg, console, lazy=True))  # the reward role: started once, if at all
            metrics: dict[str, float] = {}
            grown_at = None  # (grow, samples, eos): the Improve steps of one Grow share its samples
            for phase in phases:
                begin = max(phase.first, s.run.start_step)
                if begin > phase.end:
                    continue  # trained before the checkpoint this run resumed from
                if begin < phase.end:
                    console.print(f"[bold]{phase.name}[/]: steps {begin + 1}..{phase.end}")
                    if cfg.algorithm.name == "rest" and cfg.rest.improve_from == "grow":
                        from_grow_start(s, policy, phase, phases)
                    if grown_at is None or grown_at[0] != phase.grow:
                        grown_at = (phase.grow, *grow(s, policy, scorer, prompts, phase, phases))
                    phase_data(s, policy, phase, *grown_at[1:])
                    scale = cfg.rest.lr_decay ** phase.improve if cfg.algorithm.name == "rest" else 1.0
                    policy.call("scale_lr", scale)
                # At the phase's end (begin == end): only the evaluation, if a kill skipped it.
                metrics = s.train(stages.steps_on(policy), s.saver("policy"), s.evaluation(evaluator, policy),
                                  window=(phase.first, phase.end), loss_ratio_guard=False)
            return s.finish(policy, metrics)


# ----------------------------------------------------------------------------- Grow


def generator_id(cfg: RunConfig, s: Session, step: int) -> str:
    """Names the policy's weights at `step` of this run: the starting weights, every setting
    that changes training, and the step. Grown samples are reused only for the same name."""
    from prefopt.refcache.fingerprint import weights_fingerprint

    settings = cfg.model_dump(mode="json", exclude={"tracking", "cluster", "output_dir", "eval"})
    settings["start"] = weights_fingerprint(s.inputs.model_dir)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32] + f":step{step}"


def grow_first_step(phase: Phase, phases: list[Phase]) -> int:
    return min(p.first for p in phases if p.grow == phase.grow)


def grow_prompts(prompts, num_prompts: int | None, grow: int):
    """The prompts of Grow step `grow`: all of them, or the next num_prompts in turn."""
    from prefopt.algorithms.generate import Prompts

    n = len(prompts.ids)
    if num_prompts is None or num_prompts >= n:
        return prompts
    picked = [(grow * num_prompts + i) % n for i in range(num_prompts)]
    return Prompts([prompts.texts[i] for i in picked], [prompts.ids[i] for i in picked],
                   f"{prompts.fingerprint}:grow{grow}:{num_prompts}")


def grow(s: Session, policy, scorer, prompts, phase: Phase, phases: list[Phase]) -> tuple[dict[str, list], str]:
    """The stage: Grow step phase.grow's samples (sampled now if missing) with their scores
    (prefopt.algorithms.label's score cache). -> (columns of every sample with `score`, the
    generator's EOS text)."""
    from prefopt.algorithms import generate, label

    cfg, console = s.cfg, s.console
    g = grow_settings(cfg)
    first = grow_first_step(phase, phases)
    store = s.run.store / "rounds" / f"grow-{phase.grow}"
    # Seeds differ by Grow and by the run's seed (a sweep's seeds draw other samples).
    seed = (g.sampling.seed * 10_000 + cfg.train.seed) * 100 + phase.grow
    gen_cfg = cfg.model_copy(update={"generate": GenerateConfig(
        num_samples=g.samples_per_prompt, prompts_per_shard=g.prompts_per_shard,
        sampling=g.sampling.model_copy(update={"seed": seed}))})
    chosen = grow_prompts(prompts, g.num_prompts, phase.grow)
    manifest = generate.manifest_for(gen_cfg, s.inputs.model_dir, s.inputs.tokenizer, chosen,
                                     generator_weights=generator_id(cfg, s, first))
    samples = generate.open_samples(store / "samples", manifest)
    todo = samples.missing()
    if todo:
        if s.run.start_step > first:
            raise RoundError(f"{samples.store}: {len(todo)} shard(s) of grow {phase.grow + 1} are missing or damaged, "
                             f"but the policy has trained past step {first} where they were sampled: start the run "
                             "again in another output_dir")
        generate.check_ranks(samples, todo, cfg.policy.num_workers)
        console.print(f"grow {phase.grow + 1}: {len(chosen.ids)} prompts x {g.samples_per_prompt} samples"
                      + (f" ({len(samples.shards) - len(todo)} of {len(samples.shards)} shards already there)"
                         if len(todo) < len(samples.shards) else ""))
        sampler = s.sampler(policy)  # the policy's ranks, or vLLM engines given the weights of step `first`
        sampler.updated(first)
        generate.sample_shards(gen_cfg, sampler, chosen, samples, console, todo=todo)
    generated, tables = label.read_generated(samples.store)
    cache = label.ScoreCache(store, scorer.description, generated.shards)
    scores = label.score_shards(scorer, generated, tables, cache, console)
    columns = {c: [x for t in tables for x in t[c]] for c in tables[0]}
    columns["score"] = scores
    return columns, generated.manifest.get("eos_token")


# ----------------------------------------------------------------------------- the phase's data


def keep_threshold(scores: np.ndarray, threshold: float, on: str) -> float:
    """The reward a ReST Improve step keeps samples above: the `threshold` quantile of the grown
    set's rewards, or `threshold` on rewards min-max scaled to [0, 1] over it (the paper's)."""
    if on == "quantile":
        return float(np.quantile(scores, threshold))
    low, high = float(scores.min()), float(scores.max())
    return low + threshold * (high - low)


def rest_rows(cfg: RunConfig, grown: dict, phase: Phase, eos: str | None) -> tuple[list[dict], dict[str, float]]:
    """ReST's Improve data: the samples above the threshold (sft: as completions; a
    pairwise loss: each prompt's best against its worst kept sample). -> (rows, metrics)."""
    from prefopt.algorithms.label import build_rows, usable

    scores = np.asarray(grown["score"], dtype=np.float64)
    cut = keep_threshold(scores, phase.threshold, cfg.rest.threshold_on)
    # Above the threshold, as the paper keeps; at it only when nothing usable lies above (a top
    # quantile of ties).
    ok = np.array([usable(text, eos) for text in grown["completion"]], dtype=bool)
    above = ok & (scores > cut) if (ok & (scores > cut)).any() else ok & (scores >= cut)
    keep = [int(i) for i in np.flatnonzero(above)]
    if cfg.rest.loss == "sft":
        rows = [{"prompt": grown["prompt"][i], "completion": grown["completion"][i], "label": True} for i in keep]
    else:  # label's pairing, on the kept samples alone
        kept = {c: [grown[c][i] for i in keep] for c in ("prompt", "prompt_index", "completion")}
        rows = build_rows(kept, [float(scores[i]) for i in keep], "best_worst", min_gap=0.0, seed=0, eos_token=eos)
    metrics = {"rest/threshold": cut, "rest/kept": float(len(keep)), "rest/kept_fraction": len(keep) / len(scores),
               "rest/kept_reward": float(scores[keep].mean()) if keep else float("nan"),
               "rest/rows": float(len(rows))}
    return rows, metrics


def iterative_rows(cfg: RunConfig, grown: dict, phase: Phase, eos: str | None) -> tuple[list[dict], dict[str, float]]:
    """An iterative-DPO round's pairs, by the reward (prefopt label's pairing). -> (rows, metrics)."""
    from prefopt.algorithms.label import build_rows

    it = cfg.iterative
    rows = build_rows(grown, grown["score"], it.pairs, min_gap=it.min_gap, seed=cfg.train.seed * 1000 + phase.index,
                      eos_token=eos)
    return rows, {"iterative/pairs": float(len(rows))}


def original_rows(cfg: RunConfig, sft: bool) -> list[dict]:
    """The data's own rows for ReST's mix_original: prompt and chosen (sft) or the pairs."""
    from prefopt.data.sources import read_source

    source = read_source(cfg.data)
    out = []
    needed = ("prompt", "chosen") if sft else ("prompt", "chosen", "rejected")
    for number, row in source.rows:
        texts = [row.get(k) for k in ("prompt", "chosen", "rejected")]
        if not all(isinstance(row.get(k), str) for k in needed):
            raise RoundError(f"rest.mix_original: {source.name} {source.row_word} {number} has no text "
                             f"{', '.join(needed)} (a conversational data set cannot be mixed in); set "
                             "rest.mix_original: false")
        out.append({"prompt": texts[0], "completion": texts[1], "label": True} if sft else
                   {"prompt": texts[0], "chosen": texts[1], "rejected": texts[2]})
    return out


def phase_data(s: Session, policy, phase: Phase, grown: dict, eos: str | None):
    """The phase's rows as tokenized data on the policy's ranks, with the reference log-probs its
    loss reads (through the reference cache). -> the TokenizedData."""
    from prefopt.data import prepare

    cfg, console = s.cfg, s.console
    grown_reward = float(np.mean(grown["score"]))
    if cfg.algorithm.name == "rest":
        rows, metrics = rest_rows(cfg, grown, phase, eos)
        if cfg.rest.mix_original:
            rows += original_rows(cfg, cfg.rest.loss == "sft")
        what = (f"kept {int(metrics['rest/kept'])} of {len(grown['score'])} samples above reward "
                f"{metrics['rest/threshold']:.3f} (mean {metrics['rest/kept_reward']:.3f})")
    else:
        rows, metrics = iterative_rows(cfg, grown, phase, eos)
        what = f"{len(rows)} {cfg.iterative.pairs} pairs"
    console.print(f"{phase.name}: grown reward {grown_reward:.3f}; {what}")
    if not rows:
        raise RoundError(f"{phase.name}: no training rows ({what}): lower the thresholds (rest.thresholds) or raise "
                         "the samples per prompt (grow.samples_per_prompt)")
    metrics |= {"grow/reward": grown_reward, "grow/samples": float(len(grown["score"]))}
    log_once(s.tracker, metrics, phase.first)

    unpaired = "completion" in rows[0]
    local = s.run.local_dir / "rounds"
    local.mkdir(parents=True, exist_ok=True)
    data_file = local / f"phase-{phase.index}.jsonl"
    data_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    data_cfg = cfg.data.model_copy(update={"path": str(data_file), "task": None, "num_examples": None,
                                           "format": "unpaired" if unpaired else "preference",
                                           "ignore_columns": [], "heldout_path": None})
    with console.status(f"{phase.name}: tokenizing {len(rows)} rows"):
        data = prepare(cfg.model_copy(update={"data": data_cfg}), s.inputs.tokenizer, local / "data")
    path = stages.data_for_ranks(cfg, data)
    cache = None
    if loss_needs_reference(cfg):
        cache = reference_cache(s, policy, phase, data, path)
    policy.call("use_data", path, ref_cache=cache)
    return data


def reference_cache(s: Session, policy, phase: Phase, data, path: str):
    """The phase's reference log-probs, through the reference cache: the starting model's (the
    reference role), or the policy's as the round begins (iterative.reference: round_start)."""
    from prefopt.algorithms.precompute_ref import fill_reference_cache

    cfg = s.cfg
    round_start = cfg.algorithm.name == "iterative_dpo" and cfg.iterative.reference == "round_start"
    inputs = stages.Inputs(s.inputs.model_dir, s.inputs.tokenizer, data)

    def holding_data():
        if round_start:
            if s.run.start_step > phase.first:
                raise RoundError(f"{phase.name}: its reference cache is incomplete, but the policy has trained past "
                                 f"step {phase.first} (the round's start): start the run again in another output_dir")
            policy.call("use_data", path)
            return policy
        group = s.start_reference()
        group.call("use_data", path)
        return group

    return fill_reference_cache(cfg, inputs, s.console, holding_data,
                                weights=generator_id(cfg, s, phase.first) if round_start else None)


def log_once(tracker, metrics: dict[str, float], step: int) -> None:
    """Log a phase's data metrics at its first step, unless a run killed after logging them did."""
    key = next(iter(metrics))
    if step not in {m.step for m in tracker.client.get_metric_history(tracker.run_id, key)}:
        tracker.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)}, step=step)


# ----------------------------------------------------------------------------- improve_from: grow


def from_grow_start(s: Session, policy, phase: Phase, phases: list[Phase]) -> None:
    """ReST with improve_from: grow. At a Grow's first step its policy (weights, optimizer, RNG)
    is saved under rounds/grow-<g>/start; every later Improve step of that Grow loads it first."""
    store = s.run.store / "rounds" / f"grow-{phase.grow}"
    marker = store / "start.done"
    if phase.improve == 0:
        if not marker.is_file():
            if s.run.start_step > phase.first:
                raise RoundError(f"{store}/start: the policy of grow {phase.grow + 1} was never saved and the run has "
                                 "trained past it (rest.improve_from: grow); start again in another output_dir")
            policy.call("save_checkpoint", store.uri, "start", {"step": phase.first})
            marker.write_text(str(phase.first))
        return
    if s.run.start_step > phase.first:
        return  # resumed inside this Improve step: the checkpoint holds its own policy
    if not marker.is_file():
        raise RoundError(f"{store}/start: the policy of grow {phase.grow + 1} is missing (rest.improve_from: grow); "
                         "start the run again in another output_dir")
    policy.call("load_checkpoint", store.uri, "start")
    s.console.print(f"{phase.name}: starts again from the policy of grow {phase.grow + 1}")

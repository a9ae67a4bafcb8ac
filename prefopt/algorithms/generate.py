"""`prefopt generate`: the model's own samples of the data's prompts, as a sharded data set.

The first half of on-policy pair data (the DPO paper's sentiment protocol: sample 4 completions
per prompt from the SFT model, rank them by the reward; `prefopt label` is the second half):

    <generate.output_dir>/manifest.json          what the samples depend on (checked on resume), the shard plan
    <generate.output_dir>/shard-00000.parquet    prompts 0..prompts_per_shard-1, num_samples rows each
    ...

generate.output_dir is a local path or any store's URI (s3://...); default <output_dir>/generated.
Columns of a shard: prompt (text), prompt_index, sample, completion (text, without the EOS),
completion_tokens, logprob (summed over the completion, the model's own, temperature 1) and
finished (the completion ended with an EOS, not at max_new_tokens). It is a `prefopt.shards`
data set: each shard carries a checksum of its values, and one changed or cut short after it
was written counts as missing, so generate samples it again and label never reads it.

Prompts are those of the data (a built-in task or a file of any format with a prompt column),
tokenized exactly as training tokenizes them, duplicates dropped. Sampling is a stage on a
started policy group (`sample_shards`, prompts split across its ranks), so a multi-round
controller samples with the policy it trains. Each shard is sampled with a seed derived from
(generate.sampling.seed, shard index): a killed run keeps its finished shards, and the next run
computes only the missing ones, which come out as they would have the first time.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from prefopt import shards
from prefopt.config import RunConfig
from prefopt.errors import UserError
from prefopt.storage import Store, local_dir_for

MANIFEST = shards.MANIFEST
KIND = "prefopt.generate"  # the shards' footer key
SCHEMA = pa.schema([("prompt", pa.string()), ("prompt_index", pa.int64()), ("sample", pa.int64()),
                    ("completion", pa.string()), ("completion_tokens", pa.int64()), ("logprob", pa.float64()),
                    ("finished", pa.bool_())])
# Parts of the manifest that decide the samples: a difference in one of them is another data set.
# (model_dir is recorded for the user but not compared: the weights' fingerprint is what counts.)
DECISIVE = ("generator_weights", "dtype", "data", "num_prompts", "sampling", "num_samples", "prompts_per_shard",
            "policy_ranks", "engine")


class GeneratedMismatch(UserError, ValueError):
    """The output directory holds samples of other inputs; the message names what differs."""


@dataclass
class Prompts:
    """The data's distinct prompts: texts, token ids (as training tokenizes them), their fingerprint."""

    texts: list[str]
    ids: list[list[int]]
    fingerprint: str


def output_dir(cfg: RunConfig) -> Store:
    """generate.output_dir, else <output_dir>/generated: a local directory or a store's."""
    return Store.at(cfg.generate.output_dir) if cfg.generate.output_dir else Store.at(cfg.output_dir) / "generated"


def shard_seed(seed: int, index: int) -> int:
    """The sampling seed of one shard: the same on every run, different for every shard."""
    return seed * 1_000_000 + index


def read_prompts(cfg: RunConfig, tokenizer) -> Prompts:
    """The data's distinct prompts, tokenized as training tokenizes them.

    Any source with a prompt column works: the other columns (chosen, rejected, completion, ...)
    are ignored, and the prompt_only format tokenizes the prompt alone."""
    from prefopt.data.errors import DataError
    from prefopt.data.fingerprint import fingerprint, tokenizer_fingerprint
    from prefopt.data.prepare import check
    from prefopt.data.sources import read_source

    data = cfg.data.model_copy(update={"format": "prompt_only"})
    if data.path is not None:
        columns = read_source(cfg.data).columns
        if "prompt" not in columns:
            raise DataError(f"data.path: {data.path}: prefopt generate needs a prompt column "
                            f"(the data has {', '.join(columns) or 'none'})")
        data = data.model_copy(update={"ignore_columns": [c for c in columns if c != "prompt"]})
    checked = check(cfg.model_copy(update={"data": data}), tokenizer)
    report = checked.report
    if report.problems and cfg.data.on_bad_row == "error":
        raise DataError("\n".join([f"{len(report.problems)} bad prompt(s) in {report.source} "
                                   "(fix them, or set data.on_bad_row=skip to drop them):",
                                   *report.problem_lines()]))
    table = checked.table
    texts, ids, seen = [], [], set()
    for text, prompt_ids in zip(table["prompt"].to_pylist(), table["prompt_ids"].to_pylist(), strict=True):
        if tuple(prompt_ids) in seen:  # the same prompt twice would only get more samples
            continue
        seen.add(tuple(prompt_ids))
        texts.append(text)
        ids.append(prompt_ids)
    if not ids:
        raise DataError(f"{report.source}: no usable prompts ({report.summary()})")
    import pyarrow as pa

    fp = fingerprint(pa.table({"prompt_ids": ids}), format="prompt_only", tokenizer_id=tokenizer_fingerprint(tokenizer),
                     max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length)
    return Prompts(texts, ids, fp)


def manifest_for(cfg: RunConfig, model_dir: Path, tokenizer, prompts: Prompts,
                 generator_weights: str | None = None) -> dict:
    """What the samples depend on, and the shard plan: shard i holds prompts_per_shard prompts
    (the last one fewer), num_samples consecutive rows per prompt. generator_weights: what names
    the weights when they are not model_dir's (a policy in training: the run and its step)."""
    from prefopt.refcache.fingerprint import weights_fingerprint

    g = cfg.generate
    manifest = {
        "model_dir": str(Path(model_dir).resolve()),
        "generator_weights": generator_weights or weights_fingerprint(model_dir),
        "dtype": cfg.model.dtype,
        "data": prompts.fingerprint,
        "num_prompts": len(prompts.ids),
        "sampling": g.sampling.model_dump(mode="json"),
        "num_samples": g.num_samples,
        "prompts_per_shard": g.prompts_per_shard,
        # Each rank seeds from (seed, rank) and samples its own chunk: another number of ranks
        # draws other samples, so a resume on another number would not reproduce the missing shards.
        "policy_ranks": cfg.policy.num_workers,
        "eos_token": tokenizer.eos_token,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if cfg.rollout.engine != "hf":  # vLLM draws other samples from the same seeds; hf manifests stay as they were
        manifest["engine"] = cfg.rollout.engine
    # The ranks are left out of the fingerprint: a complete output is what it is, whatever the ranks now.
    decided = {k: manifest[k] for k in DECISIVE if k != "policy_ranks" and k in manifest}
    manifest["fingerprint"] = hashlib.sha256(json.dumps(decided, sort_keys=True).encode()).hexdigest()
    plan = shards.plan(len(prompts.ids) * g.num_samples, g.prompts_per_shard * g.num_samples, digits=5)
    manifest |= {"num_shards": len(plan), "shards": shards.plan_entries(plan)}
    return manifest


def samples_at(store: Store, manifest: dict) -> shards.Dataset:
    """The generated data set at `store` that `manifest` (as written there) describes."""
    return shards.Dataset.from_manifest(store, KIND, manifest, SCHEMA)


def open_samples(store: Store, manifest: dict) -> shards.Dataset:
    """The generated data set at `store` for these inputs, created if absent; GeneratedMismatch,
    naming what differs, if it holds samples of other inputs."""
    old = shards.read_manifest(store)
    if old is None:
        shards.write_manifest(store, manifest)
        return samples_at(store, manifest)
    differ = shards.differing(old, manifest, [k for k in (*DECISIVE, "fingerprint") if k != "policy_ranks"])
    if differ:
        raise GeneratedMismatch(f"{store} holds samples of other inputs (they differ in: {', '.join(differ)}); "
                                "set generate.output_dir to another directory, or delete it")
    return samples_at(store, old)  # the first run's manifest: it says which ranks drew the samples


def check_ranks(samples: shards.Dataset, todo: list, ranks: int) -> None:
    """A resumed output must be sampled on the ranks that drew its first shards."""
    drawn_on = samples.manifest.get("policy_ranks")
    if todo and drawn_on != ranks:
        raise GeneratedMismatch(f"{samples.store} was sampled on {drawn_on} policy rank(s) and {len(todo)} shard(s) "
                                f"are missing: each rank draws its own samples, so set policy.num_workers={drawn_on} "
                                "to resume it, or use another generate.output_dir")


def shard_rows(texts: list[str], first: int, samples: list[dict], num_samples: int, eos_id: int) -> dict[str, list]:
    """Columns of one shard from its samples (num_samples consecutive samples per prompt)."""
    rows: dict[str, list] = {k: [] for k in SCHEMA.names}
    for i, s in enumerate(samples):
        index = first + i // num_samples
        rows["prompt"].append(texts[index])
        rows["prompt_index"].append(index)
        rows["sample"].append(i % num_samples)
        rows["completion"].append(s["text"])
        rows["completion_tokens"].append(len(s["completion_ids"]))
        rows["logprob"].append(float(sum(s["logprobs"])))
        rows["finished"].append(bool(s["completion_ids"]) and s["completion_ids"][-1] == eos_id)
    return rows


def sample_shards(cfg: RunConfig, policy, prompts: Prompts, samples: shards.Dataset, console,
                  todo: list[shards.Shard] | None = None) -> None:
    """The stage: sample the shards `todo` of `samples` (default: every missing or damaged one) on
    `policy`, a started group of engine workers holding the generator (`generate` on its ranks)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    g = cfg.generate
    todo = samples.missing() if todo is None else todo
    sampling = g.sampling.model_dump(exclude={"seed"})
    eos_id = samples.manifest["eos_token_id"]
    columns = [TextColumn("[bold]generate"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]} prompts/s"), TimeRemainingColumn()]
    with Progress(*columns, console=console) as progress:
        left = sum(s.num_rows for s in todo) // g.num_samples
        bar = progress.add_task("generate", total=len(prompts.ids), completed=len(prompts.ids) - left, rate="-")
        start, done = time.perf_counter(), 0
        for shard in todo:
            first, stop = shard.start // g.num_samples, shard.stop // g.num_samples
            # Each prompt num_samples times in a row: the samples of one prompt stay together.
            repeated = [p for p in prompts.ids[first:stop] for _ in range(g.num_samples)]
            drawn = policy.split("generate", repeated, sampling, shard_seed(g.sampling.seed, shard.index))
            samples.write(shard, pa.table(shard_rows(prompts.texts, first, drawn, g.num_samples, eos_id)))
            done += stop - first
            progress.update(bar, advance=stop - first, rate=f"{done / max(time.perf_counter() - start, 1e-9):.1f}")


def run(cfg: RunConfig, console) -> str:
    """The CLI command -> where the samples are (a local path or a store's URI), complete."""
    from prefopt.algorithm_spec import SAMPLER
    from prefopt.algorithms import stages
    from prefopt.models import model_and_tokenizer

    g = cfg.generate
    stages.preflight(cfg, console, roles=[SAMPLER], tracking=False)
    store = output_dir(cfg)
    if not store.is_local:
        stages.check_writable(store, "generate.output_dir")
    with console.status("model and tokenizer"):
        model_dir, tokenizer = model_and_tokenizer(cfg.model, local_dir_for(cfg.output_dir))
    with console.status("reading and tokenizing the prompts"):
        prompts = read_prompts(cfg, tokenizer)
    samples = open_samples(store, manifest_for(cfg, model_dir, tokenizer, prompts))
    problems = samples.check()
    for shard, why in problems.items():
        if why != shards.ABSENT:
            console.print(f"generate: {store / shard.file_name}: {why}; sampling it again", markup=False,
                          highlight=False)
    num_shards = len(samples.shards)
    console.print(f"generate: {len(prompts.ids)} prompts x {g.num_samples} samples in {num_shards} shard(s) "
                  f"under {store}" + (f"; {num_shards - len(problems)} already there" if len(problems) < num_shards
                                      else ""))
    if not problems:
        return store.uri
    check_ranks(samples, list(problems), cfg.policy.num_workers)

    stages.connect(cfg, roles=[SAMPLER])
    # Inference only: no optimizer, no data.
    policy, _ = stages.start_group(cfg, "policy", console, SAMPLER.worker_class(), "build", str(model_dir), train=False)
    sampler = None
    try:
        from prefopt.rollout.sampler import make_sampler

        # rollout.engine: vllm samples on engines (the policy's ranks give the samples' log-probs).
        sampler = make_sampler(cfg, policy, str(model_dir), tokenizer, prompts.ids, console)
        sample_shards(cfg, sampler, prompts, samples, console, todo=list(problems))
    finally:
        if sampler is not None:
            sampler.shutdown()
        policy.shutdown()
    console.print(f"generated {len(prompts.ids) * g.num_samples} completions in {store}")
    return store.uri

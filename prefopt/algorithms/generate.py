"""`prefopt generate`: the model's own samples of the data's prompts, as Parquet shards.

The first half of on-policy pair data (the DPO paper's sentiment protocol: sample 4 completions
per prompt from the SFT model, rank them by the reward; `prefopt label` is the second half):

    <generate.output_dir>/manifest.json          what the samples depend on (checked on resume)
    <generate.output_dir>/shard-00000.parquet    prompts 0..prompts_per_shard-1, num_samples rows each
    ...

Columns of a shard: prompt (text), prompt_index, sample, completion (text, without the EOS),
completion_tokens, logprob (summed over the completion, the model's own, temperature 1) and
finished (the completion ended with an EOS, not at max_new_tokens).

Prompts are those of the data (a built-in task or a file of any format with a prompt column),
tokenized exactly as training tokenizes them, duplicates dropped. Sampling runs on the policy
role's ranks (`EngineWorker.generate`, prompts split across them). Each shard is sampled with a
seed derived from (generate.sampling.seed, shard index), and written to a temporary name then
renamed: a killed run keeps its finished shards, and the next run computes only the missing
ones, which come out as they would have the first time.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from prefopt.config import RunConfig
from prefopt.errors import UserError
from prefopt.storage import local_dir_for

MANIFEST = "manifest.json"
# Parts of the manifest that decide the samples: a difference in one of them is another data set.
# (model_dir is recorded for the user but not compared: the weights' fingerprint is what counts.)
DECISIVE = ("generator_weights", "dtype", "data", "num_prompts", "sampling", "num_samples", "prompts_per_shard",
            "policy_ranks")


class GeneratedMismatch(UserError, ValueError):
    """The output directory holds samples of other inputs; the message names what differs."""


def output_dir(cfg: RunConfig) -> Path:
    from prefopt.storage import local_output

    return local_output(cfg.generate.output_dir, cfg.output_dir, "generated", "generate.output_dir")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def shard_seed(seed: int, index: int) -> int:
    """The sampling seed of one shard: the same on every run, different for every shard."""
    return seed * 1_000_000 + index


def read_prompts(cfg: RunConfig, tokenizer):
    """The data's distinct prompts, tokenized as training tokenizes them -> (texts, ids, fingerprint).

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
    return texts, ids, fp


def manifest_for(cfg: RunConfig, model_dir: Path, tokenizer, data_fingerprint: str, num_prompts: int) -> dict:
    from prefopt.refcache.fingerprint import weights_fingerprint

    g = cfg.generate
    return {
        "model_dir": str(Path(model_dir).resolve()),
        "generator_weights": weights_fingerprint(model_dir),
        "dtype": cfg.model.dtype,
        "data": data_fingerprint,
        "num_prompts": num_prompts,
        "sampling": g.sampling.model_dump(mode="json"),
        "num_samples": g.num_samples,
        "prompts_per_shard": g.prompts_per_shard,
        # Each rank seeds from (seed, rank) and samples its own chunk: another number of ranks
        # draws other samples, so a resume on another number would not reproduce the missing shards.
        "policy_ranks": cfg.policy.num_workers,
        "num_shards": -(-num_prompts // g.prompts_per_shard),
        "eos_token": tokenizer.eos_token,
    }


def check_manifest(directory: Path, manifest: dict) -> None:
    """Refuse a directory holding samples of other inputs, naming what differs."""
    path = directory / MANIFEST
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    differ = [k for k in DECISIVE if k != "policy_ranks" and old.get(k) != manifest.get(k)]
    if differ:
        raise GeneratedMismatch(f"{directory} holds samples of other inputs (they differ in: {', '.join(differ)}); "
                                "set generate.output_dir to another directory, or delete it")
    missing = [i for i in range(manifest["num_shards"]) if not (directory / shard_name(i)).is_file()]
    if missing and old.get("policy_ranks") != manifest["policy_ranks"]:
        # A complete output is what it is, whatever the ranks now; a resumed one must draw as before.
        raise GeneratedMismatch(f"{directory} was sampled on {old.get('policy_ranks')} policy rank(s) and "
                                f"{len(missing)} shard(s) are missing: each rank draws its own samples, so set "
                                f"policy.num_workers={old.get('policy_ranks')} to resume it, or use another "
                                "generate.output_dir")


def write_shard(directory: Path, index: int, rows: dict[str, list]) -> None:
    """Written whole to a temporary name, then renamed: a shard file is always complete."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    final = directory / shard_name(index)
    tmp = directory / f".{final.name}.{os.getpid()}.tmp"
    pq.write_table(pa.table(rows), tmp)
    os.replace(tmp, final)


def shard_rows(texts: list[str], first: int, samples: list[dict], num_samples: int, eos_id: int) -> dict[str, list]:
    """Columns of one shard from its samples (num_samples consecutive samples per prompt)."""
    rows: dict[str, list] = {k: [] for k in ("prompt", "prompt_index", "sample", "completion",
                                             "completion_tokens", "logprob", "finished")}
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


def run(cfg: RunConfig, console) -> Path:
    """The CLI command -> the output directory, complete."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from prefopt.algorithms import stages
    from prefopt.cluster.engine_worker import EngineWorker
    from prefopt.cluster.worker_group import WorkerGroup
    from prefopt.models import model_and_tokenizer

    g = cfg.generate
    stages.preflight(cfg, console, with_reference=False, tracking=False)
    with console.status("model and tokenizer"):
        model_dir, tokenizer = model_and_tokenizer(cfg.model, local_dir_for(cfg.output_dir))
    with console.status("reading and tokenizing the prompts"):
        texts, prompt_ids, data_fp = read_prompts(cfg, tokenizer)
    directory = output_dir(cfg)
    manifest = manifest_for(cfg, model_dir, tokenizer, data_fp, len(prompt_ids))
    check_manifest(directory, manifest)
    directory.mkdir(parents=True, exist_ok=True)
    for tmp in directory.glob(".shard-*.tmp"):  # half-written by a killed run: never a shard
        tmp.unlink(missing_ok=True)
    if not (directory / MANIFEST).is_file():  # an existing one matches (checked) and records the first run
        tmp = directory / f".{MANIFEST}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        os.replace(tmp, directory / MANIFEST)

    num_shards = manifest["num_shards"]
    missing = [i for i in range(num_shards) if not (directory / shard_name(i)).is_file()]
    console.print(f"generate: {len(prompt_ids)} prompts x {g.num_samples} samples in {num_shards} shard(s) "
                  f"under {directory}" + (f"; {num_shards - len(missing)} already there" if len(missing) < num_shards
                                          else ""))
    if not missing:
        return directory

    stages.connect(cfg, with_reference=False)
    with console.status(f"starting {cfg.policy.num_workers} policy worker(s) for sampling"):
        group = WorkerGroup(EngineWorker, cfg.policy, cfg.cluster, name="policy", key="policy",
                            init_args=(cfg.model_dump_json(),))
    try:
        group.call("build", str(model_dir), train=False)  # inference only: no optimizer, no data
        sampling = g.sampling.model_dump(exclude={"seed"})
        columns = [TextColumn("[bold]generate"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]} prompts/s"), TimeRemainingColumn()]
        with Progress(*columns, console=console) as progress:
            todo = sum(len(range(i * g.prompts_per_shard, min((i + 1) * g.prompts_per_shard, len(prompt_ids))))
                       for i in missing)
            bar = progress.add_task("generate", total=len(prompt_ids), completed=len(prompt_ids) - todo, rate="-")
            start, done = time.perf_counter(), 0
            for index in missing:
                first = index * g.prompts_per_shard
                shard_prompts = prompt_ids[first : first + g.prompts_per_shard]
                # Each prompt num_samples times in a row: the samples of one prompt stay together.
                repeated = [p for p in shard_prompts for _ in range(g.num_samples)]
                samples = group.split("generate", repeated, sampling, shard_seed(g.sampling.seed, index))
                write_shard(directory, index, shard_rows(texts, first, samples, g.num_samples,
                                                         tokenizer.eos_token_id))
                done += len(shard_prompts)
                progress.update(bar, advance=len(shard_prompts),
                                rate=f"{done / max(time.perf_counter() - start, 1e-9):.1f}")
    finally:
        group.shutdown()
    console.print(f"generated {len(prompt_ids) * g.num_samples} completions in {directory}")
    return directory

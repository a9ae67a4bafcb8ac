"""Generated samples and score caches as `prefopt.shards` data sets: `prefopt generate` and `prefopt
label` write theirs to an s3:// output (the tests' S3-compatible server, tests/s3_server.py), a
generate that lost a shard there samples that shard alone, and a shard changed or cut short after
it was written is recomputed (generate, the score cache) or refused in one line naming it (label
reading the samples): never used, never a crash."""

import io
import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console
from typer.testing import CliRunner

from prefopt import shards
from prefopt.algorithms import generate, label
from prefopt.cli import app
from prefopt.config import load_config
from prefopt.storage import Store

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ONPOLICY = ROOT / "configs/tiny/onpolicy.yaml"
# 8 prompts, 3 a shard: 3 generated shards (4 samples of each prompt).
SETS = ["data.num_examples=8", "generate.prompts_per_shard=3", "generate.sampling.max_new_tokens=6"]


def invoke(command: str, *sets: str):
    return CliRunner().invoke(app, [command, str(ONPOLICY), *(a for s in sets for a in ("--set", s))])


def shard_files(store: Store) -> dict[str, bytes]:
    return {name: (store / name).read_bytes() for name in store.children() if name.startswith("shard-")}


def mtimes(store: Store) -> dict[str, float]:
    return {name: mtime for name, _, mtime in store.files() if name.startswith("shard-")}


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_generate_and_label_write_to_s3_and_a_generate_that_lost_a_shard_there_samples_it_alone(
        tmp_path, tiny_model_dir, ray_local, s3):
    bucket = s3.bucket(f"b-{os.urandom(4).hex()}")
    sets = [f"model.path={tiny_model_dir}", f"output_dir={tmp_path / 'run'}", *SETS,
            f"generate.output_dir={bucket}/generated", f"label.output_dir={bucket}/labelled"]
    result = invoke("generate", *sets)
    assert result.exit_code == 0, result.output
    generated = Store.at(f"{bucket}/generated")
    first = shard_files(generated)
    assert list(first) == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    manifest = json.loads((generated / "manifest.json").read_text())
    assert [s["num_rows"] for s in manifest["shards"]] == [12, 12, 8] and not (tmp_path / "run" / "generated").exists()

    result = invoke("label", *sets, "label.pairs=all_pairs")
    assert result.exit_code == 0, result.output
    labelled = Store.at(f"{bucket}/labelled")
    rows = [json.loads(line) for line in (labelled / "pairs.jsonl").read_text().splitlines()]
    from prefopt.tasks import get_task

    reward = get_task("imdb_sentiment").reward
    assert rows and all(reward([r["prompt"]] * 2, [r["chosen"], r["rejected"]]) == sorted(
        reward([r["prompt"]] * 2, [r["chosen"], r["rejected"]]), reverse=True) for r in rows)
    (cache,) = (labelled / "scores").children()
    assert list(shard_files(labelled / "scores" / cache)) == list(first)  # a score shard per generated shard
    assert json.loads((labelled / "manifest.json").read_text())["generated_dir"] == generated.uri

    # A run that died after its first shards: shard 1 is gone. The next run samples it alone, as
    # it came out the first time, and leaves the others as they are.
    (generated / "shard-00001.parquet").delete()
    kept = {n: t for n, t in mtimes(generated).items()}
    time.sleep(1.1)  # a rewrite would show in the store's (second-resolution) modification times
    result = invoke("generate", *sets)
    assert result.exit_code == 0, result.output
    assert "2 already there" in " ".join(result.output.split())
    assert shard_files(generated) == first
    assert {n: t for n, t in mtimes(generated).items() if n in kept} == kept


def test_a_changed_or_truncated_generated_shard_is_never_labelled_and_is_sampled_again(
        tmp_path, tiny_model_dir, ray_local):
    cfg = load_config(ONPOLICY, [f"model.path={tiny_model_dir}", f"output_dir={tmp_path / 'run'}", *SETS])
    out = Path(generate.run(cfg, Console(file=io.StringIO())))
    first = {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.parquet"))}

    # Shard 2's completions changed (still valid Parquet, its footer kept); shard 0 cut short.
    table = pq.read_table(out / "shard-00002.parquet")
    changed = table.to_pydict()
    changed["completion"][0] = " the best film ever made, a masterpiece"
    pq.write_table(pa.Table.from_pydict(changed, schema=table.schema), out / "shard-00002.parquet")
    (out / "shard-00000.parquet").write_bytes(first["shard-00000.parquet"][:-50])
    sets = [f"model.path={tiny_model_dir}", f"output_dir={tmp_path / 'run'}", *SETS]
    result = invoke("label", *sets)
    assert result.exit_code == 2, result.output  # the user's input, said in one line: no traceback, no "bug"
    (line,) = error_lines(result.output)
    assert "2 generated shard(s) damaged, never labelled" in line and "run prefopt generate again" in line
    assert "shard-00000.parquet: unreadable, truncated or not Parquet" in line
    assert "shard-00002.parquet: checksum mismatch" in line and "Traceback" not in result.output
    assert not (tmp_path / "run" / "labelled" / "pairs.jsonl").exists()

    kept = (out / "shard-00001.parquet").stat().st_mtime_ns
    console = Console(file=io.StringIO(), width=400)
    generate.run(cfg, console)
    said = console.file.getvalue()
    assert "shard-00000.parquet: unreadable, truncated or not Parquet" in said and "sampling it again" in said
    assert "shard-00002.parquet: checksum mismatch" in said and "1 already there" in said
    assert {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.parquet"))} == first  # as sampled first
    assert (out / "shard-00001.parquet").stat().st_mtime_ns == kept
    assert invoke("label", *sets).exit_code == 0


def test_a_changed_or_truncated_score_shard_on_s3_is_scored_again(tmp_path, s3):
    from test_label_resume import scored_shards, write_generated

    generated = tmp_path / "generated"
    write_generated(generated, num_prompts=64, per_shard=16)  # 4 shards of 64 completions, no model
    out = s3.bucket(f"b-{os.urandom(4).hex()}") + "/labelled"
    cfg = load_config(ONPOLICY, [f"output_dir={tmp_path / 'run'}", f"label.input_dir={generated}",
                                 f"label.output_dir={out}"])

    def labelled() -> str:
        console = Console(file=io.StringIO(), width=400)
        label.run(cfg, console)
        return console.file.getvalue()

    assert scored_shards(labelled())[:2] == (4, 4)
    straight = Store.at(out) / "pairs.jsonl"
    pairs = straight.read_bytes()
    cache = Store.at(out) / "scores" / label.scorer_fingerprint(label.scorer_description(cfg))[:16]
    first = shard_files(cache)

    # Score shard 1 with one score changed (valid Parquet, its footer kept), shard 3 cut short.
    table = pq.read_table(pa.BufferReader(first["shard-00001.parquet"]))
    scores = table["score"].to_pylist()
    scores[0] += 1.0
    sink = pa.BufferOutputStream()
    pq.write_table(table.set_column(table.column_names.index("score"), "score", pa.array(scores, pa.float64())), sink)
    (cache / "shard-00001.parquet").write_bytes(sink.getvalue().to_pybytes())
    (cache / "shard-00003.parquet").write_bytes(first["shard-00003.parquet"][:-30])
    kept = {n: t for n, t in mtimes(cache).items() if n in ("shard-00000.parquet", "shard-00002.parquet")}
    time.sleep(1.1)
    said = labelled()
    assert scored_shards(said)[:2] == (2, 4), said
    assert "shard-00001.parquet: checksum mismatch" in said and "shard-00003.parquet: unreadable, truncated" in said
    assert shard_files(cache) == first and straight.read_bytes() == pairs  # as scored the first time
    assert {n: t for n, t in mtimes(cache).items() if n in kept} == kept
    assert shards.Dataset(cache, label.SCORES_KIND, label.scorer_fingerprint(label.scorer_description(cfg)),
                          generate.samples_at(Store.at(generated), json.loads(
                              (generated / "manifest.json").read_text())).shards).check() == {}


def test_sampling_is_a_stage_on_a_started_policy_group_and_the_command_finishes_what_it_left(
        tmp_path, tiny_model_dir, ray_local):
    """What a multi-round controller does: its own policy group samples one shard through the
    stage, as a run killed after its first shard leaves it; `prefopt generate` samples the rest."""
    from prefopt.algorithms import stages
    from prefopt.cluster.engine_worker import EngineWorker
    from prefopt.models import model_and_tokenizer

    cfg = load_config(ONPOLICY, [f"model.path={tiny_model_dir}", f"output_dir={tmp_path / 'run'}", *SETS])
    console = Console(file=io.StringIO(), width=400)
    model_dir, tokenizer = model_and_tokenizer(cfg.model, tmp_path / "work")
    prompts = generate.read_prompts(cfg, tokenizer)
    samples = generate.open_samples(generate.output_dir(cfg), generate.manifest_for(cfg, model_dir, tokenizer, prompts))
    policy, _ = stages.start_group(cfg, "policy", console, EngineWorker, "build", str(model_dir), train=False)
    try:
        generate.sample_shards(cfg, policy, prompts, samples, console, todo=samples.shards[:1])
    finally:
        policy.shutdown()
    assert list(samples.check()) == samples.shards[1:]
    out = Path(samples.store.uri)
    kept = (out / "shard-00000.parquet").stat().st_mtime_ns

    console = Console(file=io.StringIO(), width=400)
    generate.run(cfg, console)
    assert "1 already there" in console.file.getvalue()
    assert (out / "shard-00000.parquet").stat().st_mtime_ns == kept and samples.check() == {}
    table = pq.read_table(out / "shard-00002.parquet").to_pydict()
    assert table["prompt_index"] == [i for i in (6, 7) for _ in range(4)] and table["prompt"][0] == prompts.texts[6]

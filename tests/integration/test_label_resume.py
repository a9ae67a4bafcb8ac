"""`prefopt label` scores shard by shard into a cache keyed by scorer: a run stopped halfway (its
shards deleted or cut short, or the process killed with SIGKILL) scores only the missing shards on
the next run and writes the same bytes as an uninterrupted one; a regenerated shard is a miss (its
unchanged completions are found, not scored again)."""

import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console

from prefopt import shards
from prefopt.algorithms import generate, label
from prefopt.config import load_config
from prefopt.storage import Store

ROOT = Path(__file__).resolve().parents[2]
ONPOLICY = ROOT / "configs/tiny/onpolicy.yaml"


def config(tmp_path, model_dir, *overrides):
    # 8 prompts, 2 a shard: 4 generated shards of 8 completions; scored by the task's ground truth.
    model = [f"model.path={model_dir}"] if model_dir else []  # label alone needs no model
    return load_config(ONPOLICY, [*model, f"output_dir={tmp_path / 'run'}", "data.num_examples=8",
                                  "generate.prompts_per_shard=2", "generate.sampling.max_new_tokens=8", *overrides])


def labelled(tmp_path, model_dir, out: Path, *overrides) -> tuple[str, float]:
    """Label into `out` -> (what it printed, seconds)."""
    console = Console(file=io.StringIO(), width=400)
    start = time.perf_counter()
    label.run(config(tmp_path, model_dir, f"label.output_dir={out}", *overrides), console)
    return console.file.getvalue(), time.perf_counter() - start


def scored_shards(printed: str) -> tuple[int, int, int]:
    """(shards scored, of how many, completions scored) from label's report."""
    m = re.search(r"scored (\d+) of (\d+) shard\(s\), scores reused for \d+ \((\d+) completion\(s\) scored", printed)
    assert m, printed
    return int(m[1]), int(m[2]), int(m[3])


def _rows(generated: Path) -> list[tuple[str, str]]:
    return [(p, c) for name in sorted(generated.glob("shard-*.parquet"))
            for p, c in zip(*pq.read_table(generated / name, columns=["prompt", "completion"]).to_pydict().values(),
                            strict=True)]


def test_label_resumes_from_its_score_shards_and_writes_what_an_uninterrupted_run_writes(
        tmp_path, tiny_model_dir, ray_local, capsys):
    cfg = config(tmp_path, tiny_model_dir)
    generated = Path(generate.run(cfg, Console(file=io.StringIO())))
    assert len(list(generated.glob("shard-*.parquet"))) == 4

    straight = tmp_path / "straight"
    printed, straight_s = labelled(tmp_path, tiny_model_dir, straight)
    assert scored_shards(printed) == (4, 4, len(set(_rows(generated))))  # each distinct completion once
    (cache,) = (straight / "scores").iterdir()
    fingerprint = label.scorer_fingerprint(label.scorer_description(cfg))
    assert cache.name == fingerprint[:16]
    assert json.loads((cache / "scorer.json").read_text()) == {"source": "task", "task": "imdb_sentiment"}
    for name in (f"shard-0000{i}.parquet" for i in range(4)):  # one score shard per generated shard, row for row
        got, gen = pq.read_table(cache / name).to_pydict(), pq.read_table(generated / name).to_pydict()
        assert got["completion"] == gen["completion"] and got["prompt"] == gen["prompt"]

    # What a killed run leaves: shards 0 and 1 written, shard 2 half-written (a temporary file, or a
    # file cut short), shard 3 never started. The next run scores shards 2 and 3 alone.
    resumed = tmp_path / "resumed"
    resumed_cache = resumed / "scores" / cache.name
    resumed_cache.mkdir(parents=True)
    for name in ("shard-00000.parquet", "shard-00001.parquet"):
        (resumed_cache / name).write_bytes((cache / name).read_bytes())
    (resumed_cache / ".shard-00002.parquet.4242.tmp").write_bytes(b"PAR1")
    (resumed_cache / "shard-00002.parquet").write_bytes((cache / "shard-00002.parquet").read_bytes()[:100])
    kept = {n: (resumed_cache / n).stat().st_mtime_ns for n in ("shard-00000.parquet", "shard-00001.parquet")}
    printed, resumed_s = labelled(tmp_path, tiny_model_dir, resumed)
    assert scored_shards(printed)[:2] == (2, 4) and "scores reused for 2 (" in printed
    assert {n: (resumed_cache / n).stat().st_mtime_ns for n in kept} == kept
    assert not list(resumed_cache.glob(".*.tmp"))
    for name in ("pairs.jsonl", "scores.parquet"):  # the same bytes as the uninterrupted run's
        assert (resumed / name).read_bytes() == (straight / name).read_bytes(), name

    # Another pairs mode or min_gap: nothing scored, every shard reused.
    printed, again_s = labelled(tmp_path, tiny_model_dir, resumed, "label.pairs=best_worst", "label.min_gap=0.1")
    assert scored_shards(printed) == (0, 4, 0) and "scores reused for 4 (" in printed
    rows = [json.loads(line) for line in (resumed / "pairs.jsonl").read_text().splitlines()]
    assert 1 <= len(rows) <= 8

    # A regenerated shard is a miss, never a silent reuse: one completion of shard 1 changes (written
    # as generate writes a shard: with its checksum); that shard is scored again, its unchanged
    # completions found among the earlier scores.
    samples = generate.samples_at(Store.at(generated), json.loads((generated / generate.MANIFEST).read_text()))
    changed = pq.read_table(generated / "shard-00001.parquet").to_pydict()
    changed["completion"][0] = " a wonderful, moving film"
    samples.write(samples.shards[1], pa.table(changed))
    printed, _ = labelled(tmp_path, tiny_model_dir, resumed)
    assert scored_shards(printed) == (1, 4, 1) and "7 repeats or found in the cache" in printed  # of its 8
    score1 = pq.read_table(resumed_cache / "shard-00001.parquet").to_pydict()
    assert score1["completion"] == changed["completion"]
    from prefopt.tasks import get_task

    assert score1["score"][0] == get_task("imdb_sentiment").reward([changed["prompt"][0]], [changed["completion"][0]])[0]
    with capsys.disabled():
        print(f"\n  label of 32 completions in 4 shards: {straight_s:.2f} s uninterrupted, {resumed_s:.2f} s resumed "
              f"(2 shards reused), {again_s:.2f} s another pairs mode (4 reused)")


def write_generated(directory: Path, num_prompts: int = 2048, per_shard: int = 64, samples: int = 4) -> None:
    """A large generated set as `prefopt generate` writes it (no model: words drawn at random), so
    that scoring it takes seconds."""
    rng = random.Random(0)
    words = "the film was great awful boring moving superb dreadful plot cast ending loved hated fine".split()
    plan = shards.plan(num_prompts * samples, per_shard * samples, digits=5)
    manifest = {"fingerprint": "random words", "shards": shards.plan_entries(plan), "num_shards": len(plan),
                "num_prompts": num_prompts, "eos_token": "</s>"}
    shards.write_manifest(Store.at(directory), manifest)
    data = generate.samples_at(Store.at(directory), manifest)
    for shard in plan:
        index = [p for p in range(shard.start // samples, shard.stop // samples) for _ in range(samples)]
        data.write(shard, pa.table({
            "prompt": [f"Review {p}:" for p in index], "prompt_index": index, "sample": [0, 1, 2, 3] * per_shard,
            "completion": [" " + " ".join(rng.choices(words, k=30)) for _ in index],
            "completion_tokens": [30] * len(index), "logprob": [-1.0] * len(index), "finished": [True] * len(index)}))


def test_a_killed_label_process_scores_only_the_missing_shards_next_time(tmp_path, capsys):
    generated = tmp_path / "generated"
    write_generated(generated)
    sets = [f"label.input_dir={generated}", "label.pairs=best_random"]
    printed, straight_s = labelled(tmp_path, None, tmp_path / "straight", *sets)
    assert scored_shards(printed)[:2] == (32, 32)

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "prefopt", "label", str(ONPOLICY),
                             *(a for s in (*sets, f"label.output_dir={out}") for a in ("--set", s))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not list(out.glob("scores/*/shard-*.parquet")) and time.time() < deadline:
        assert proc.poll() is None, "label ended before its first score shard"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = len(list(out.glob("scores/*/shard-*.parquet")))
    assert 1 <= kept < 32 and not (out / "pairs.jsonl").exists(), kept

    printed, resumed_s = labelled(tmp_path, None, out, *sets)
    assert scored_shards(printed)[:2] == (32 - kept, 32) and f"scores reused for {kept} (" in printed
    for name in ("pairs.jsonl", "scores.parquet"):
        assert (out / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    with capsys.disabled():
        print(f"\n  label of 8192 completions in 32 shards: {straight_s:.2f} s uninterrupted; killed after {kept} "
              f"shard(s), the rerun scored {32 - kept} in {resumed_s:.2f} s")

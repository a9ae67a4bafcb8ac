"""Preparing a preference corpus: rows per second and peak memory, by corpus size, in one run.

    .venv/bin/python benchmarks/data_prepare.py                      # 50 k, 200 k, 1 M pairs
    .venv/bin/python benchmarks/data_prepare.py --sizes 20000 50000  # a quick look

Synthetic JSON Lines pairs (about 440 bytes a row, like the issue's), the run's tokenizer (the
tiny model's), `prefopt.data.prepare` as a run calls it, each measurement in a fresh process so
that its peak is its own. Three ways for each size:

- one process, tokenizer threads off: data.num_proc=1 and TOKENIZERS_PARALLELISM=false, the
  baseline the parallel rate is compared with (one core's work);
- one process, tokenizer threads on: data.num_proc=1 with the Rust tokenizer's own thread pool
  (what `TOKENIZERS_PARALLELISM` unset gives: only the batch encode runs on every core);
- all CPUs: data.num_proc = the CPUs available (one process each; with data.num_proc null a
  preparation of fewer than 16 parts stays in the calling process, as the second way).

Peak memory: the driver's (VmHWM of the process that calls prepare), the largest of the
worker processes' (sampled as parts complete), and a rank's: a fresh process that opens the
tokenized data from its path and collates 200 random micro-batches of 8, as a training rank
does. A rank's memory is given in two columns: "rank MB" is its own (anonymous) memory, the
peak of RssAnon; "rank file MB" is the pages of the memory-mapped data file it has mapped
(RssFile at the end). Those are the kernel's page cache: shared by every rank of a host, dropped
under memory pressure, and more than the rows read (each fault maps the cached pages around it). Rates are rows of the file per second of the whole `prepare` call (start-up of worker
processes, fingerprint and the final write included). Only ratios within one run count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

WORDS = ("the a movie film was great terrible plot acting story good bad really very not quite boring fun "
         "loved hated ending scene music actor director long short cast score pacing dialogue").split()

DRIVER = textwrap.dedent("""
    import json, sys, time
    import psutil

    def peak_mb():  # VmHWM: this process image's own peak (ru_maxrss would carry over the forking parent's)
        line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
        return int(line.split()[1]) / 1024

    def main():
        from transformers import AutoTokenizer
        from prefopt.config import RunConfig
        from prefopt.data import prepare

        path, model_dir, out_dir, num_proc = sys.argv[1:5]
        data = {"path": path, "max_length": 160, "max_prompt_length": 64, "on_bad_row": "skip"}
        data["num_proc"] = int(num_proc)
        cfg = RunConfig.model_validate({"data": data})
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        me, workers = psutil.Process(), [0]

        def sample(done, total):
            for child in me.children(recursive=True):
                try:
                    workers[0] = max(workers[0], child.memory_info().rss)
                except psutil.Error:
                    pass

        start = time.perf_counter()
        td = prepare(cfg, tokenizer, out_dir, sample)
        seconds = time.perf_counter() - start
        print(json.dumps({"seconds": seconds, "rows": td.report.rows_read, "kept": td.num_rows,
                          "fingerprint": td.fingerprint, "path": str(td.path),
                          "driver_mb": peak_mb(),
                          "worker_mb": workers[0] / 2**20}))

    if __name__ == "__main__":
        main()
""")

RANK = textwrap.dedent("""
    import json, random, sys
    from prefopt.data import TokenizedData, collate

    def status():
        return {k: int(l.split()[1]) / 1024 for l in open("/proc/self/status")
                for k in ("VmHWM", "RssAnon", "RssFile") if l.startswith(k + ":")}

    td = TokenizedData.open(sys.argv[1])
    rnd = random.Random(0)
    private = 0
    for _ in range(200):
        rows = td.rows(sorted(rnd.sample(range(td.num_rows), 8)))
        collate(rows, pad_token_id=td.pad_token_id, packing=True, max_length=td.max_length)
        private = max(private, status()["RssAnon"])
    end = status()
    print(json.dumps({"rank_mb": private, "rank_file_mb": end["RssFile"], "rank_hwm_mb": end["VmHWM"]}))
""")


def write_corpus(path: Path, n: int) -> None:
    rnd = random.Random(n)

    def say(k: int) -> str:
        return " ".join(rnd.choice(WORDS) for _ in range(k))

    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Review {i}: {say(14)}", "chosen": " " + say(rnd.randint(20, 34)),
                                "rejected": " " + say(rnd.randint(20, 34))}) + "\n")


def run(script: str, *args: str, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if out.returncode != 0:
        raise SystemExit(f"failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000, 1_000_000])
    parser.add_argument("--workdir", type=Path, default=None, help="where corpora and outputs go (a temp dir)")
    args = parser.parse_args()
    import tokenizers
    import transformers

    from prefopt.config import TinyModelConfig
    from prefopt.data.parts import available_cpus
    from prefopt.models import save_tiny

    work = args.workdir or Path(tempfile.mkdtemp(prefix="prefopt-data-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = save_tiny(work / "tiny-model", TinyModelConfig())
    print(f"CPU: {cpu_model()}; {os.cpu_count()} CPUs; Python {platform.python_version()}, "
          f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}")
    ways = [("1 process, tokenizer threads off", "1", {"TOKENIZERS_PARALLELISM": "false"}),
            ("1 process, tokenizer threads on", "1", {"TOKENIZERS_PARALLELISM": "true"}),
            (f"all CPUs ({available_cpus()} processes)", str(available_cpus()), {})]
    header = f"{'rows':>9} | {'way':<34} | {'s':>7} | {'rows/s':>7} | {'x 1 proc':>8} | {'driver MB':>9} | " \
             f"{'worker MB':>9} | {'rank MB':>7} | {'rank file MB':>12}"
    print(header)
    print("-" * len(header))
    for n in args.sizes:
        corpus = work / f"pairs-{n}.jsonl"
        if not corpus.exists():
            write_corpus(corpus, n)
        base, fingerprints = None, set()
        for i, (name, num_proc, env) in enumerate(ways):
            out = work / f"out-{n}-{i}"
            result = run(DRIVER, str(corpus), str(model_dir), str(out), num_proc, env=env)
            rank = run(RANK, result["path"])
            rate = result["rows"] / result["seconds"]
            base = base or rate
            fingerprints.add(result["fingerprint"])
            print(f"{n:>9} | {name:<34} | {result['seconds']:>7.1f} | {rate:>7.0f} | {rate / base:>8.2f} | "
                  f"{result['driver_mb']:>9.0f} | {result['worker_mb']:>9.0f} | {rank['rank_mb']:>7.0f} | "
                  f"{rank['rank_file_mb']:>12.0f}", flush=True)
            subprocess.run(["rm", "-rf", str(out)], check=True)
        print(f"{n:>9} | corpus {corpus.stat().st_size / 2**20:.0f} MiB, "
              f"{corpus.stat().st_size / n:.0f} bytes a row; fingerprints equal: {len(fingerprints) == 1}")


if __name__ == "__main__":
    main()

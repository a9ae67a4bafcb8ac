"""A damaged checkpoint, for real: DeepSpeed ZeRO-3 on two CPU ranks in Ray, its files listed in
the state file as they are saved, one cut in half, and the resume that falls back past it."""

import io
import json
import logging
import random
from pathlib import Path

import pytest
from rich.console import Console

from prefopt.algorithms.checkpoints import CHECKPOINTS, FILES, STATE_FILE, checkpoint_problem
from prefopt.algorithms.offline import train
from prefopt.config import load_config
from prefopt.storage import Store

pytestmark = pytest.mark.integration

TINY_DPO = Path(__file__).resolve().parents[2] / "configs/tiny/dpo.yaml"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    with path.open("w") as f:
        for _ in range(32):
            f.write(json.dumps({"prompt": rng.choice(["The film", "The plot", "It"]),
                                "chosen": " " + rng.choice(["was wonderful.", "is superb."]),
                                "rejected": " " + rng.choice(["was awful.", "is dreadful."])}) + "\n")
    return path


def read_metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def test_a_damaged_latest_checkpoint_resumes_from_the_previous_one_to_the_same_loss(tmp_path, tiny_model_dir, pairs,
                                                                                    ray_local, caplog):
    out = tmp_path / "run"
    cfg = load_config(TINY_DPO, [f"model.path={tiny_model_dir}", f"data.path={pairs}", "data.task=null",
                                 f"output_dir={out}", "policy.num_workers=2", "train.max_steps=4",
                                 "train.save_steps=2", "train.log_steps=1"])
    train(cfg, Console(file=io.StringIO()))
    straight = read_metrics(out)

    # The state file lists every file DeepSpeed and prefopt wrote into the checkpoint, each once.
    step4 = out / CHECKPOINTS / "step4"
    listed = json.loads((step4 / STATE_FILE).read_text())[FILES]
    on_disk = {p.name: p.stat().st_size for p in step4.iterdir() if p.is_file() and p.name != STATE_FILE}
    assert {name: entry["size"] for name, entry in listed.items()} == on_disk
    assert {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt",
            "rng_rank0.pt", "rng_rank1.pt"} <= set(listed)

    model_states = step4 / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    whole = model_states.read_bytes()
    model_states.write_bytes(whole[: len(whole) // 2])

    with caplog.at_level(logging.WARNING, logger="prefopt.checkpoints"):
        train(cfg, Console(file=io.StringIO()))
    assert caplog.messages == [f"{step4}: {model_states.name} is {len(whole) // 2} bytes, {len(whole)} listed: "
                               "resuming from step2"]
    resumed = read_metrics(out)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]  # the log trimmed to step 2, then steps 3 and 4 again
    for before, after in zip(straight[2:], resumed[2:], strict=True):
        assert after["loss"] == pytest.approx(before["loss"], abs=1e-5)
    assert checkpoint_problem(Store.at(step4), json.loads((step4 / STATE_FILE).read_text())[FILES]) is None

"""The training-health guard on made-up loss curves (no Ray, no model)."""

import json
import math

import pytest

from prefopt.algorithms.stages import CHECKPOINTS, STATE_FILE, HealthGuard, Run, TrainingDiverged
from prefopt.config import HealthConfig
from prefopt.storage import Store


def guard(tmp_path, checkpoint=None, **health):
    return HealthGuard(HealthConfig(**health), Run(Store.at(tmp_path), tmp_path, checkpoint))


def feed(g, losses, start=1):
    for step, loss in enumerate(losses, start=start):
        g.check(step, {"loss": loss, "grad_norm": 1.0})


def test_a_loss_above_the_ratio_for_patience_steps_stops(tmp_path):
    for step in (2, 4):  # checkpoints saved before and during the run of high losses
        (tmp_path / CHECKPOINTS / f"step{step}").mkdir(parents=True)
        (tmp_path / CHECKPOINTS / f"step{step}" / STATE_FILE).write_text(json.dumps({"step": step}))
    g = guard(tmp_path, max_loss_ratio=5.0, patience=3)
    feed(g, [0.69, 0.7, 3.0, 3.4])  # below 5 x 0.69 = 3.45
    feed(g, [3.5], start=5)  # one high step, then back
    feed(g, [1.0], start=6)
    with pytest.raises(TrainingDiverged, match=r"at step 9: the loss \(40\) has stayed above 5 x") as err:
        feed(g, [10.0, 20.0, 40.0], start=7)
    # The streak began at step 7: the last good checkpoint is step 4, not anything later.
    assert f"{tmp_path / CHECKPOINTS / 'step4'} (step 4)" in str(err.value)


def test_non_finite_stops_at_once_and_a_falling_loss_never_does(tmp_path):
    g = guard(tmp_path)
    feed(g, [25.0 - i for i in range(20)])  # IPO-like: starts high, falls
    with pytest.raises(TrainingDiverged, match="not finite"):
        g.check(21, {"loss": 1.0, "grad_norm": math.inf})
    with pytest.raises(TrainingDiverged, match="no checkpoint was saved"):
        guard(tmp_path).check(1, {"loss": math.nan})
    off = guard(tmp_path, enabled=False)
    off.check(1, {"loss": math.nan})


def test_a_resumed_run_keeps_the_first_loss_of_the_run(tmp_path):
    g = guard(tmp_path, checkpoint=("step10", {"step": 10, "first_loss": 0.69}), patience=2)
    g.check(11, {"loss": 3.0})  # 3.0 would be the yardstick if the guard forgot the first loss
    with pytest.raises(TrainingDiverged):
        g.check(12, {"loss": 3.6})
        g.check(13, {"loss": 3.6})

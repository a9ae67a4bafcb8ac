"""Reward-model training (`algorithm.name: reward_model`): the controller, top to bottom.

    result = train(cfg, console)

A causal LM with a scalar head learns r(x, y) from preference pairs with the Bradley–Terry
loss (prefopt.losses.reward), on the `policy` section's ranks (ZeRO-3 and all), with the same
data plan, checkpoints, resume, health guard and MLflow logging as the offline losses. Its
held-out pairwise accuracy is measured at step 0, every eval.every_steps and at the end: on
the built-in task's test split, or on `data.heldout_path`. The result is exported as the base
model's ...ForSequenceClassification, which plain transformers loads.
"""

from __future__ import annotations

from prefopt.algorithms import stages
from prefopt.algorithms.session import Session, TrainResult
from prefopt.config import RunConfig
from prefopt.storage import local_dir_for


def train(cfg: RunConfig, console, *, resume: bool | None = None) -> TrainResult:
    with Session.open(cfg, console, resume=resume) as s:
        if s.inputs.data.kind != "pair":
            raise stages.PreflightError(f"algorithm.name=reward_model trains on preference pairs; the data is "
                                        f"{s.inputs.data.format}")
        heldout = _heldout(cfg, s.inputs, console)
        with s.tracking():
            group = s.start("policy", "setup", s.inputs.rank_model_dir(), s.inputs.rank_data_path(),
                            heldout_path=stages.data_for_ranks(cfg, heldout) if heldout else None)
            evaluate = (lambda step: _evaluate(group, heldout, step, s.tracker, console)) if heldout else None
            metrics = s.train(stages.steps_on(group), s.saver("policy"), evaluate)
            return s.finish(group, metrics)


def _heldout(cfg: RunConfig, inputs, console):
    """Held-out pairs, tokenized like the training pairs: data.heldout_path, or the task's test split."""
    from prefopt.data import prepare

    if cfg.data.heldout_path is None and cfg.data.task is None:
        return None
    update = ({"path": cfg.data.heldout_path} if cfg.data.heldout_path
              else {"split": "test", "num_examples": cfg.eval.num_prompts})
    held_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update=update)})
    with console.status("reading, validating and tokenizing the held-out pairs"):
        heldout = prepare(held_cfg, inputs.tokenizer, local_dir_for(cfg.output_dir) / "heldout")
    console.print(f"held-out pairs: {heldout.report.summary()}")
    return heldout


def _evaluate(group, heldout, step: int, tracker, console) -> dict[str, float]:
    from prefopt.eval.stats import mean_and_se

    rewards = group.split("heldout_rewards", list(range(heldout.num_rows)))
    # A tie is half a win (as eval/win_rate counts it): a fresh head scoring every pair 0 is at 0.5.
    accuracy, accuracy_se = mean_and_se([1.0 if c > r else 0.5 if c == r else 0.0 for c, r in rewards])
    metrics = {"eval/rm_accuracy": accuracy, "eval/rm_accuracy_se": accuracy_se,
               "eval/rm_margin": sum(c - r for c, r in rewards) / len(rewards)}
    tracker.log_metrics(metrics, step=step)
    console.print(f"eval at step {step}: held-out pairwise accuracy {metrics['eval/rm_accuracy']:.3f} "
                  f"± {metrics['eval/rm_accuracy_se']:.3f} "
                  f"({len(rewards)} pairs), mean margin {metrics['eval/rm_margin']:.3f}")
    return metrics

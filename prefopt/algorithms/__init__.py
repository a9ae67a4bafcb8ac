"""Controllers, one file per algorithm, built from the stages in stages.py."""

from __future__ import annotations


def train(cfg, console, *, resume: bool | None = None):
    """Run the controller `algorithm.name` belongs to: PPO, a reward model, or an offline loss."""
    from prefopt.losses import REWARD_LOSSES

    if cfg.algorithm.name == "ppo":
        from prefopt.algorithms.ppo import train as train_ppo

        return train_ppo(cfg, console, resume=resume)
    if cfg.algorithm.name in REWARD_LOSSES:
        from prefopt.algorithms.reward_model import train as train_reward_model

        return train_reward_model(cfg, console, resume=resume)
    from prefopt.algorithms.offline import train as train_offline

    return train_offline(cfg, console, resume=resume)

"""Connect to Ray: a local instance by default, or a cluster at `cluster.address`."""

from __future__ import annotations

import os

from prefopt.config import ClusterConfig, RoleConfig

# Workers inherit these through the runtime env, so a remote cluster behaves like the laptop.
WORKER_ENV = ("DS_ACCELERATOR", "TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE", "OMP_NUM_THREADS")


def connect(cluster: ClusterConfig, roles: list[RoleConfig], *, log_to_driver: bool = True) -> None:
    """Start or join Ray once per process; a local instance is sized to hold every role's ranks.
    log_to_driver=False: the ranks' output stays in Ray's log files (a sweep's table owns the terminal)."""
    import ray

    if ray.is_initialized():
        return
    from prefopt.storage import store_env

    # The object store's credentials too: every rank saves and resumes there when output_dir is one.
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ} | store_env(os.environ)
    if not any(role.gpus_per_worker for role in roles):
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    kwargs: dict = {"runtime_env": {"env_vars": env}, "log_to_driver": log_to_driver}
    if cluster.address is None:
        # A local instance sized for the job even on a 1-core laptop: CPU "slots" are logical.
        need = sum(role.num_workers * role.cpus_per_worker for role in roles) + 1
        # "local": a new instance of our own, never one that `ray start` left running on this machine.
        kwargs.update(address="local", num_cpus=max(os.cpu_count() or 1, int(need + 0.999)))
    else:
        kwargs["address"] = cluster.address
    ray.init(**kwargs)

"""A group of Ray actors, one per rank, placed together and joined into one process group.

The single-controller pattern: the driver holds a WorkerGroup and calls methods on every rank
at once (`call`), each rank runs the same step on its own shard, and the driver gathers the
results. Rank 0 chooses the rendezvous address; every rank then sets the torch.distributed
environment and calls deepspeed.init_distributed (gloo on CPU, NCCL on GPUs).
"""

from __future__ import annotations

import socket
from typing import Any

from prefopt.config import ClusterConfig


class ClusterError(RuntimeError):
    """The cluster cannot give what the config asks for, or a rank failed."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class RankEnv:
    """Mixin for worker actors: where am I, and join the process group."""

    def node_address(self) -> tuple[str, str]:
        import ray

        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    def pick_port(self) -> int:
        return free_port()

    def join_process_group(self, *, master_addr: str, master_port: int, rank: int, world_size: int,
                           local_rank: int, backend: str, timeout_s: int) -> None:
        import datetime
        import os

        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
        self.rank, self.world_size = rank, world_size


class WorkerGroup:
    """N actors of `actor_cls`, gang-scheduled in one placement group and rendezvoused."""

    def __init__(self, actor_cls: type, cluster: ClusterConfig, *, name: str, init_args: tuple = ()):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.name, self.size = name, cluster.num_workers
        bundle = {"CPU": cluster.cpus_per_worker}
        if cluster.gpus_per_worker:
            bundle["GPU"] = cluster.gpus_per_worker
        self.placement_group = placement_group([dict(bundle)] * self.size, strategy=cluster.placement_strategy)
        try:
            ray.get(self.placement_group.ready(), timeout=cluster.collective_timeout_s)
        except ray.exceptions.GetTimeoutError:
            total = ray.cluster_resources()
            ray.util.remove_placement_group(self.placement_group)
            raise ClusterError(
                f"{name}: could not place {self.size} workers of {bundle} within "
                f"{cluster.collective_timeout_s}s; the cluster has {total}. Lower cluster.num_workers "
                "or cluster.cpus_per_worker / cluster.gpus_per_worker, or add nodes."
            ) from None
        remote_cls = ray.remote(actor_cls)
        self.actors = [
            remote_cls.options(
                num_cpus=cluster.cpus_per_worker,
                num_gpus=cluster.gpus_per_worker,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.placement_group, placement_group_bundle_index=i
                ),
                name=f"{name}-rank{i}-{self.placement_group.id.hex()[:8]}",
            ).remote(*init_args)
            for i in range(self.size)
        ]
        self._rendezvous(backend="nccl" if cluster.gpus_per_worker else "gloo",
                         timeout_s=cluster.collective_timeout_s)

    def _rendezvous(self, backend: str, timeout_s: int) -> None:
        import ray

        nodes = ray.get([a.node_address.remote() for a in self.actors])
        master_addr = nodes[0][1]
        master_port = ray.get(self.actors[0].pick_port.remote())
        seen: dict[str, int] = {}
        local_ranks = []
        for node_id, _ in nodes:
            local_ranks.append(seen.get(node_id, 0))
            seen[node_id] = seen.get(node_id, 0) + 1
        self.call("join_process_group", master_addr=master_addr, master_port=master_port,
                  world_size=self.size, backend=backend, timeout_s=timeout_s,
                  per_rank={"rank": list(range(self.size)), "local_rank": local_ranks})

    def call(self, method: str, *args: Any, per_rank: dict[str, list] | None = None, **kwargs: Any) -> list:
        """Run `method` on every rank at once and wait for all results (rank order).

        `per_rank` gives keyword arguments that differ by rank: {name: [value for each rank]}.
        """
        import ray

        refs = []
        for rank, actor in enumerate(self.actors):
            rank_kwargs = kwargs | {key: values[rank] for key, values in (per_rank or {}).items()}
            refs.append(getattr(actor, method).remote(*args, **rank_kwargs))
        try:
            return ray.get(refs)
        except ray.exceptions.RayActorError as exc:
            raise ClusterError(f"{self.name}: a worker died during {method}: {exc}") from exc

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        ray.util.remove_placement_group(self.placement_group)

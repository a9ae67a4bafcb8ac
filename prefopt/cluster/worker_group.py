"""A group of Ray actors, one per rank of one model role, placed together and joined into one
process group.

The single-controller pattern: the driver holds a WorkerGroup per role and calls it in one of
two ways (verl's dispatch modes, written once here):

    group.call("train_steps", 0, 10)       same call on every rank -> [result of rank 0, 1, ...]
    group.split("generate", prompts, s)    items split into equal contiguous chunks, one per
                                           rank -> the per-item results, in item order

Both have a non-blocking twin (`call_async`, `split_async`), so that several groups compute at
the same time; `as_completed` collects split calls of several groups as each group finishes.

Rank 0 chooses the rendezvous address; every rank then sets the torch.distributed environment
and calls deepspeed.init_distributed (gloo on CPU, NCCL on GPUs). The group checks the cluster
can hold it before asking Ray for anything, so an impossible request fails in a second.
"""

from __future__ import annotations

import itertools
import math
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefopt.config import ClusterConfig, RoleConfig
from prefopt.errors import CLUSTER, UserError


class ClusterError(UserError, RuntimeError):
    """The cluster cannot give what the config asks for, or a rank failed."""

    exit_code = CLUSTER


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def bundle_of(role: RoleConfig) -> dict[str, float]:
    bundle = {"CPU": float(role.cpus_per_worker)}
    if role.gpus_per_worker:
        bundle["GPU"] = float(role.gpus_per_worker)
    return bundle


def cluster_nodes() -> list[dict[str, float]]:
    """The resources of each live node of the connected Ray cluster."""
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def check_fits(name: str, key: str, role: RoleConfig, nodes: list[dict[str, float]] | None = None) -> None:
    """Fail now, naming the config keys, when no placement could ever hold the role's ranks:
    a resource no node has, a bundle larger than every node, or more than the whole cluster.
    nodes: each node's resources (default: the connected Ray cluster's)."""
    bundle = bundle_of(role)
    nodes = cluster_nodes() if nodes is None else nodes
    total = {r: sum(n.get(r, 0.0) for n in nodes) for r in bundle}
    for resource, amount in bundle.items():
        field = f"{key}.{'gpus' if resource == 'GPU' else 'cpus'}_per_worker"
        if total[resource] == 0:
            raise ClusterError(f"{name}: {field}={amount:g} but no node of the cluster has a {resource}; "
                               f"set {field}: 0 or use a cluster with {resource}s")
        if not any(n.get(resource, 0.0) >= amount for n in nodes):
            biggest = max(n.get(resource, 0.0) for n in nodes)
            raise ClusterError(f"{name}: {field}={amount:g} but the largest node has {biggest:g} {resource}; "
                               f"lower {field}")
        if total[resource] < amount * role.num_workers:
            raise ClusterError(f"{name}: {role.num_workers} ranks x {amount:g} {resource} = "
                               f"{amount * role.num_workers:g}, the cluster has {total[resource]:g}; lower "
                               f"{key}.num_workers or {field}, or add nodes")


def check_fit_together(roles: list[tuple[str, str, RoleConfig]], nodes: list[dict[str, float]] | None = None) -> None:
    """Fail now when roles that each fit cannot all be held at once (they would wait for one
    another's resources until cluster.collective_timeout_s): their ranks' CPUs or GPUs add up to
    more than the whole cluster has. roles: (name, config section, role) of the roles alive at
    the same time. A total that fits can still fail to pack onto the nodes; Ray's placement
    then decides (and times out), so this never refuses what could run."""
    if len(roles) < 2:
        return
    nodes = cluster_nodes() if nodes is None else nodes
    for resource, field in (("CPU", "cpus_per_worker"), ("GPU", "gpus_per_worker")):
        asked = [(name, key, role.num_workers, bundle_of(role).get(resource, 0.0)) for name, key, role in roles]
        need = sum(n * amount for _, _, n, amount in asked)
        have = sum(node.get(resource, 0.0) for node in nodes)
        if need > have:
            names = ", ".join(name for name, *_ in asked)
            terms = " + ".join(f"{n} x {amount:g} ({key})" for _, key, n, amount in asked if amount)
            raise ClusterError(f"{names} run at the same time and together need {terms} = {need:g} {resource}, the "
                               f"cluster has {have:g}; lower num_workers or {field} of one of them, or add nodes")


# Set while a sweep trial runs (prefopt.sweep.trial): the trial's placement group, reserved by Ray
# Tune before the trial started, and the bundles each role's ranks take in it.
_TRIAL: dict = {}
_STARTED = itertools.count()  # numbers actor names: a role may start again in the same placement group


@contextmanager
def in_trial_bundles(placement_group, slots: dict[str, list[int]]):
    """Within this block, a role's group places its ranks in `slots[role]` of `placement_group`
    instead of asking Ray for a placement group of its own: a trial's roles start at once, never
    waiting for another trial's resources (Tune queues the trial until all its bundles are free)."""
    _TRIAL.update(placement_group=placement_group, slots=slots)
    try:
        yield
    finally:
        _TRIAL.clear()


def trial_strategy(name: str, index: int):
    """Inside a sweep trial, the scheduling strategy that puts actor `index` of role `name` into
    its bundle of the trial's placement group (prefopt.algorithm_spec.trial_bundles); None
    outside one. For actors that are not a WorkerGroup's ranks (vLLM engines)."""
    if not _TRIAL:
        return None
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(placement_group=_TRIAL["placement_group"],
                                            placement_group_bundle_index=_TRIAL["slots"][name][index])


class WorkerGroup:
    """`role.num_workers` actors of `actor_cls`, gang-scheduled in one placement group and rendezvoused.

    name: how messages name the group ("policy", "reference"); key: its config section.
    """

    def __init__(self, actor_cls: type, role: RoleConfig, cluster: ClusterConfig, *, name: str, key: str,
                 init_args: tuple = ()):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.name, self.size = name, role.num_workers
        bundle = bundle_of(role)
        self.owns_placement = not _TRIAL
        if _TRIAL:
            self.placement_group, indices = _TRIAL["placement_group"], _TRIAL["slots"].get(name)
            if indices is None or len(indices) != self.size:
                raise RuntimeError(f"{name}: the trial reserved bundles {indices} for {self.size} rank(s)")
        else:
            check_fits(name, key, role)
            self.placement_group, indices = self._reserve(bundle, cluster), list(range(self.size))
        remote_cls, number = ray.remote(actor_cls), next(_STARTED)
        self.actors = [
            remote_cls.options(
                num_cpus=role.cpus_per_worker,
                num_gpus=role.gpus_per_worker,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.placement_group, placement_group_bundle_index=index
                ),
                name=f"{name}-rank{i}-{self.placement_group.id.hex()[:8]}-{number}",
            ).remote(*init_args)
            for i, index in enumerate(indices)
        ]
        self._rendezvous(backend="nccl" if role.gpus_per_worker else "gloo",
                         timeout_s=cluster.collective_timeout_s)

    def _reserve(self, bundle: dict[str, float], cluster: ClusterConfig):
        """A placement group of one bundle per rank, ready (or a ClusterError after
        cluster.collective_timeout_s)."""
        import ray
        from ray.util.placement_group import placement_group

        group = placement_group([dict(bundle)] * self.size, strategy=cluster.placement_strategy)
        try:
            ray.get(group.ready(), timeout=cluster.collective_timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(group)
            raise ClusterError(
                f"{self.name}: the cluster has the resources for {self.size} x {bundle} but they stayed busy "
                f"for {cluster.collective_timeout_s}s (cluster.collective_timeout_s); available now: "
                f"{ray.available_resources()}"
            ) from None
        return group

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
        return self.wait(self.call_async(method, *args, per_rank=per_rank, **kwargs), method)

    def call_async(self, method: str, *args: Any, per_rank: dict[str, list] | None = None, **kwargs: Any) -> list:
        """As `call`, without waiting: the Ray object refs, one per rank (see `wait`)."""
        refs = []
        for rank, actor in enumerate(self.actors):
            rank_kwargs = kwargs | {key: values[rank] for key, values in (per_rank or {}).items()}
            refs.append(getattr(actor, method).remote(*args, **rank_kwargs))
        return refs

    def wait(self, refs: list, method: str) -> list:
        """The results of one call on every rank. The first rank to fail ends the wait at once
        (the others may be stuck in a collective, waiting for it), and its error arrives as the
        worker's own: a user error as itself, anything else named by group, rank and method."""
        import ray

        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(ready[0])
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause
                if isinstance(cause, UserError):
                    raise cause from None
                raise ClusterError(f"{self.name}: rank {refs.index(ready[0])} failed in {method}: "
                                   f"{type(cause).__name__}: {cause}") from exc
            except ray.exceptions.RayActorError as exc:
                raise ClusterError(f"{self.name}: rank {refs.index(ready[0])} died during {method} (out of "
                                   f"memory, killed, or its node was lost): {str(exc).splitlines()[0]}"
                                   ) from exc
        return ray.get(refs)

    def split(self, method: str, items: list, *args: Any, **kwargs: Any) -> list:
        """Run `method(chunk, *args, **kwargs)` on every rank with its share of `items`; the
        method returns one result per item, and this returns them in item order.

        Every rank gets the same number of items (the last chunk is padded by repeating the last
        item, and those results are dropped): ZeRO-3 ranks must run the same forwards together.
        """
        return self.split_async(method, items, *args, **kwargs).wait()

    def split_async(self, method: str, items: list, *args: Any, **kwargs: Any) -> SplitCall:
        """As `split`, without waiting: the call in flight, whose `wait()` gives the results."""
        if not items:
            return SplitCall(self, method, [], 0)  # nothing to send
        per = math.ceil(len(items) / self.size)
        padded = list(items) + [items[-1]] * (per * self.size - len(items))
        chunks = [padded[r * per : (r + 1) * per] for r in range(self.size)]
        refs = [getattr(actor, method).remote(chunk, *args, **kwargs)
                for actor, chunk in zip(self.actors, chunks, strict=True)]
        return SplitCall(self, method, refs, len(items))

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        if self.owns_placement:  # a trial's placement group is Tune's to release
            ray.util.remove_placement_group(self.placement_group)


class SplitCall:
    """A `WorkerGroup.split` in flight: one Ray object ref per rank, `count` items in all."""

    def __init__(self, group: WorkerGroup, method: str, refs: list, count: int):
        self.group, self.method, self.refs, self.count = group, method, refs, count

    def wait(self) -> list:
        """The per-item results, in item order (the padding's dropped); a failed rank raises as in
        WorkerGroup.wait."""
        chunks = self.group.wait(self.refs, self.method)
        return [item for chunk in chunks for item in chunk][: self.count]


def as_completed(calls: dict) -> Iterator[tuple[str, list]]:
    """(name, results) of split calls in flight together (on different groups), each as soon as
    its group is done. A call is anything with `refs` (the Ray refs it waits on) and `wait()`:
    a SplitCall, or a scorer's handle (prefopt.algorithms.scoring); one with no refs (scores
    computed already) comes first.

    It waits for the first rank of any call, then for the rest of that call's group: a group's
    ranks get equal chunks and compute together, so they end together, and a failed rank is
    raised at once, by WorkerGroup.wait, while the other groups are still running.
    """
    import ray

    for name, call in calls.items():
        if not call.refs:  # no items were sent
            yield name, call.wait()
    owner = {ref: name for name, call in calls.items() for ref in call.refs}
    pending = list(owner)
    while pending:
        [ref], pending = ray.wait(pending, num_returns=1)
        name = owner[ref]
        yield name, calls[name].wait()
        pending = [r for r in pending if owner[r] != name]

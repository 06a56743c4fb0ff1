"""One placement-group bundle per rank of an EP replica, and each rank's core on its own bundle's GPU.

Serve gives an `ep_size` N replica a placement group of N bundles (app.py) and places the replica actor in
bundle 0: rank 0's core is the actor's child and runs on the actor's own resources. For every other rank r
a small actor, RankBundle, is scheduled into bundle r asking for that bundle's resources (its CPUs, its
GPU): it holds them for the replica's lifetime, so Ray's accounting shows each rank in its own bundle, and
reports what Ray assigned it (a BundleGrant). Rank r's core process is launched by the replica (it owns
the core's socket and watches its exit) with only its bundle's GPU visible (CUDA_VISIBLE_DEVICES from the
grant), so on a GPU node each rank has one GPU, the one Ray reserved for its bundle. On CPUs the grant
carries no GPU and the command is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

# How long the replica waits for its rank bundles' actors (their bundles are reserved already: Serve
# created the placement group before it placed the replica).
BUNDLE_LEASE_TIMEOUT_S = 60.0
GPU = "GPU"
ENV_COMMAND = "env"  # coreutils env(1): sets the variable, then execs the core (same pid)


@dataclass(frozen=True)
class BundleGrant:
    """What Ray assigned rank `rank`'s bundle of the replica's placement group."""

    rank: int
    bundle_index: int
    placement_group_id: str
    node_id: str
    gpu_ids: tuple[str, ...]  # the bundle's GPUs (empty on CPUs)

    def core_command(self, command: Sequence[str]) -> tuple[str, ...]:
        """`command` run with only this bundle's GPUs visible."""
        if not self.gpu_ids:
            return tuple(command)
        return (ENV_COMMAND, f"CUDA_VISIBLE_DEVICES={','.join(self.gpu_ids)}", *command)


def current_grant(rank: int, bundle_index: int) -> BundleGrant:
    """The grant of the calling worker (a RankBundle, or the replica actor for rank 0)."""
    context = ray.get_runtime_context()
    gpu_ids = context.get_accelerator_ids().get(GPU, [])
    return BundleGrant(rank, bundle_index, context.get_placement_group_id(), context.get_node_id(),
                       tuple(str(i) for i in gpu_ids))


@ray.remote
class RankBundle:
    """Holds one rank's bundle for the replica's lifetime; owned by the replica actor, so it goes with it."""

    def __init__(self, rank: int) -> None:
        self._grant = current_grant(rank, rank)

    def grant(self) -> BundleGrant:
        return self._grant


class RankBundles:
    """The bundles of an EP replica's ranks: rank 0's (the replica's own), a RankBundle for each other."""

    def __init__(self, placement_group, ep_size: int, num_cpus: float, num_gpus: float) -> None:
        self._holders = []
        for rank in range(1, ep_size):
            strategy = PlacementGroupSchedulingStrategy(placement_group, placement_group_bundle_index=rank)
            options = RankBundle.options(num_cpus=num_cpus, num_gpus=num_gpus, scheduling_strategy=strategy)
            self._holders.append(options.remote(rank))
        try:
            grants = [holder.grant.remote() for holder in self._holders]
            others = ray.get(grants, timeout=BUNDLE_LEASE_TIMEOUT_S)
        except BaseException:
            self.release()
            raise
        self.grants: list[BundleGrant] = [current_grant(0, 0), *others]

    @classmethod
    def lease(cls, ep_size: int, num_cpus: float, num_gpus: float) -> RankBundles | None:
        """The ranks' bundles of the calling replica; None outside a placement group (an engine built
        in-process, outside Serve): its ranks then share the caller's resources."""
        if not ray.is_initialized():  # get_current_placement_group would start a Ray instance
            return None
        placement_group = ray.util.get_current_placement_group()
        if placement_group is None:
            return None
        if len(placement_group.bundle_specs) < ep_size:
            raise ValueError(f"an ep_size {ep_size} replica needs {ep_size} bundles in its placement group, "
                             f"it has {len(placement_group.bundle_specs)}")
        return cls(placement_group, ep_size, num_cpus, num_gpus)

    def core_commands(self, command: Sequence[str]) -> list[tuple[str, ...]]:
        """Rank r's core command: `command` on bundle r's GPUs."""
        return [grant.core_command(command) for grant in self.grants]

    def release(self) -> None:
        for holder in self._holders:
            ray.kill(holder)
        self._holders = []

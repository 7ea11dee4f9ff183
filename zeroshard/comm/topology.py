"""Which ranks share a node: torchrun's environment, read once.

torchrun numbers ranks node by node: node `GROUP_RANK` holds global ranks
[GROUP_RANK·L, (GROUP_RANK+1)·L), with L = `LOCAL_WORLD_SIZE`. So 4 ranks started with
`LOCAL_WORLD_SIZE=2` on one machine behave as 2 nodes of 2, which is how the tests and
benchmarks simulate nodes. Without `LOCAL_WORLD_SIZE` (a plain script, a pool of spawned
ranks) the whole world is one node.

Bytes are split into intra-node and inter-node by destination: a collective is counted as if
every rank sent each peer its share directly (what gloo's exchange and an all-to-all do), so a
rank's share of a collective over `peers` goes inter-node in the proportion of its peers that
live on another node. For a ring the total is the same; which links carry it is not.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class NodeTopology:
    """`world_size` global ranks on nodes of `local_world_size` consecutive ranks."""

    world_size: int
    local_world_size: int

    def __post_init__(self) -> None:
        if self.local_world_size < 1 or self.world_size % self.local_world_size:
            raise ValueError(
                f"LOCAL_WORLD_SIZE={self.local_world_size} does not divide the world size "
                f"{self.world_size}: zeroshard expects every node to run the same number of "
                "ranks (torchrun --nproc_per_node)"
            )

    @classmethod
    def from_env(cls, world_size: int) -> NodeTopology:
        """torchrun's `LOCAL_WORLD_SIZE`; the whole world is one node without it."""
        raw = os.environ.get("LOCAL_WORLD_SIZE")
        local = int(raw) if raw else world_size
        return cls(world_size, min(local, world_size) if local > 0 else local)

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.local_world_size

    def node_of(self, global_rank: int) -> int:
        return global_rank // self.local_world_size

    def node_ranks(self, node: int) -> list[int]:
        lo = node * self.local_world_size
        return list(range(lo, lo + self.local_world_size))

    def inter_fraction(self, global_ranks: Sequence[int], me: int) -> float:
        """Share of what rank `me` sends to the other ranks of `global_ranks` (evenly) that
        leaves its node."""
        peers = [r for r in global_ranks if r != me]
        if not peers:
            return 0.0
        mine = self.node_of(me)
        return sum(self.node_of(r) != mine for r in peers) / len(peers)


def inter_fraction(world: int, local: int | None, rank: int) -> float:
    """Share of `rank`'s peers (the whole world's) on other nodes of `local` ranks (None:
    one node)."""
    return NodeTopology(world, min(local or world, world)).inter_fraction(range(world), rank)


def consecutive_groups(ranks: Sequence[int], size: int) -> list[list[int]]:
    """`ranks` cut into runs of `size` (hpZ's secondary partitions, nodes)."""
    return [list(ranks[i : i + size]) for i in range(0, len(ranks), size)]


def strided_groups(ranks: Sequence[int], size: int) -> list[list[int]]:
    """For runs of `size`: the ranks with the same position in every run (one per node, at
    each local index: qgZ's inter-node step)."""
    return [list(ranks[i::size]) for i in range(size)]

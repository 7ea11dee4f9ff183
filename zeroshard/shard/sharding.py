"""`Sharding`: what a stage provides to `ZeroOptimizer`, whatever the stage.

A stage is a builder of shard groups plus the collectives around the update: where
gradients are reduced (`grads`, a `GradPath`), how updated shards reach the full parameters
(`gather_params`), and which tensors it holds. `FlatSharding` (shard/flat.py) is stages 0-2,
`UnitSharding` (stage3/sharding.py) is stage 3; the optimizer's `step` is the same for both.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor, nn

from zeroshard.comm.collectives import Comm
from zeroshard.shard.codec import StateCodec
from zeroshard.shard.grad_reducer import GradPath
from zeroshard.shard.group import ShardGroup
from zeroshard.shard.placement import Placement


class Sharding(Protocol):
    stage: int
    comm: Comm
    grads: GradPath
    model: nn.Module | None  # the model whose parameter names a layout reports, when known

    def build_groups(
        self, group_index: int, params: list[Tensor], codec: StateCodec, placement: Placement
    ) -> list[ShardGroup]:
        """Shard groups for one param group's trainable `params` (none if this rank holds
        nothing of them)."""
        ...

    def gather_params(self) -> None:
        """After every group's update: make the updated shards visible where forward reads."""
        ...

    def finish_param_gather(self) -> None:
        """Wait for any `gather_params` still in flight: the parameters are whole after it."""
        ...

    def held_tensors(self) -> dict[str, list[Tensor]]:
        """"params", "grads" and "comm_buffers" tensors this rank holds, and under "host"
        those of them that live in host memory (optional)."""
        ...

    def relink_moved(self) -> None:
        """Re-attach parameters whose storage was replaced since construction."""
        ...

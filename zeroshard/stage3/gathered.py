"""`GatheredParameters`: full stage-3 parameters for user code, written back on exit.

    with zeroshard.GatheredParameters(model.head.weight, modifier_rank=0):
        if rank == 0:
            model.head.weight.normal_()      # custom init, weight surgery, ...

Every rank must enter (the gather is collective). On exit with `modifier_rank` set, that
rank's full tensors are broadcast and every rank copies its own chunk into its shard (the
fp32 master of a bf16/fp16 run follows through the unit's listeners). With
`modifier_rank=None` the parameters are read-only: changes are discarded. Parameters that
are not sharded (plain tensors, persistent units without a modifier) pass through.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType

import torch
from torch import Tensor

from zeroshard.stage3 import registry
from zeroshard.stage3.unit import ShardedUnit


class GatheredParameters:
    def __init__(
        self,
        params: Tensor | Iterable[Tensor],
        modifier_rank: int | None = None,
        enabled: bool = True,
    ) -> None:
        if isinstance(params, Tensor):
            params = [params]
        self.units: list[ShardedUnit] = []
        for p in params:
            u = registry.unit_of(p)
            if u is not None and u not in self.units:
                self.units.append(u)
        self.modifier_rank = modifier_rank
        self.enabled = enabled
        if self.units and modifier_rank is not None:
            world = self.units[0].comm.world_size
            if not 0 <= modifier_rank < world:
                raise ValueError(
                    f"rank {self.units[0].comm.rank}: modifier_rank {modifier_rank} is not a "
                    f"rank of the {world}-rank group"
                )

    def __enter__(self) -> GatheredParameters:
        if not self.enabled:
            return self
        for u in self.units:
            u.gather(exact=True)  # the true values, which a modifier writes back
        for u in self.units:
            u.wait()
            u.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.enabled:
            return
        try:
            if self.modifier_rank is not None and exc_type is None:
                with torch.no_grad():
                    for u in self.units:
                        self._publish(u)
        finally:
            for u in self.units:
                u.drop_use()
                u.release_if_unused()

    def _publish(self, u: ShardedUnit) -> None:
        assert u.full is not None and self.modifier_rank is not None
        if u.comm.rank == self.modifier_rank:
            # user code may have rebound .data; fold it into the flat buffer first
            for s in u.slots:
                view = u.full[s.offset : s.offset + s.numel]
                if s.param.data.data_ptr() != view.data_ptr() and s.param.numel() == s.numel:
                    view.copy_(s.param.data.reshape(-1))
        u.comm.broadcast(u.full, src=self.modifier_rank)
        u.write_back()
        u.notify_rewritten()

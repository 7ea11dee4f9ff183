"""`MetaComm`: the collectives of one rank of a world that does not exist (the estimator).

It implements `Collectives` as `Comm` does, on meta tensors: bytes are counted with the same
ring formula (`collectives.count`), nothing is sent or waited for.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from zeroshard.comm.collectives import DONE, CommCounter, WireCodec, count


class MetaComm:
    """The collectives of rank `rank` in a world of `world_size`, counted only."""

    def __init__(self, world_size: int, rank: int, counter: CommCounter | None = None,
                 inter_fraction: float = 0.0) -> None:  # fmt: skip
        """`counter`: a parent's (a subgroup); `inter_fraction`: the share of this rank's
        peers on other nodes (comm/topology.py)."""
        self.initialized = True
        self.group = None
        self.rank, self.world_size = rank, world_size
        self.counter = counter if counter is not None else CommCounter()
        self.inter_fraction = inter_fraction
        self.list_forms = False

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def _sent(self, kind: str, tensor: Tensor, codec: WireCodec | None) -> None:
        count(self.counter, kind, codec.encode(tensor) if codec is not None else tensor,
              self.world_size, inter_fraction=self.inter_fraction)  # fmt: skip

    def all_reduce(self, tensor: Tensor, op: str = "avg", async_op: bool = False,
                   codec: WireCodec | None = None) -> Any:  # fmt: skip
        self._sent("all_reduce", tensor, codec)
        return DONE if async_op else None

    def reduce_scatter(self, output: Tensor, input: Tensor, op: str = "avg",
                       async_op: bool = False, codec: WireCodec | None = None,
                       one_collective: bool = True) -> Any:  # fmt: skip
        self._sent("reduce_scatter", input, codec)
        return DONE if async_op else None

    def all_gather(self, output: Tensor, input: Tensor, async_op: bool = False,
                   codec: WireCodec | None = None, one_collective: bool = True) -> Any:  # fmt: skip
        self._sent("all_gather", output, codec)
        return DONE if async_op else None

    def all_to_all(self, output: Tensor, input: Tensor, async_op: bool = False) -> Any:
        return DONE if async_op else None  # counted by its caller, as `Comm.all_to_all`

    def broadcast(self, tensor: Tensor, src: int = 0, codec: WireCodec | None = None,
                  counted: bool = True) -> None:  # fmt: skip
        if counted:
            self._sent("broadcast", tensor, codec)

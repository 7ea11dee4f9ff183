"""Stage 3's collectives: `Comm`, with gloo's fast list forms for the per-unit traffic.

On gloo (torch 2.13, 2 CPU ranks, 17 MB of fp32) the tensor forms are slow:
`reduce_scatter_tensor` 54-86 ms and `all_gather_into_tensor` 33-40 ms, against 27 ms and
29 ms for the list forms `reduce_scatter(out, chunks)` / `all_gather(chunks, in)` over views
of the same flat buffers (no copies: the chunks are views), and 27 ms for an all-reduce of
the whole buffer. Stage 3 sends all of its bytes through these two, three times per step, so
it uses the list forms there. The bytes counted are the same as `Comm`'s (ring volumes).
Elsewhere (NCCL) the tensor forms are the fast ones and are used unchanged.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from ..collectives import Comm, _nbytes, _reduce_op


class Stage3Comm(Comm):
    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(group)
        self.list_forms = self.active and dist.get_backend(group) == "gloo"

    def all_gather(self, output: Tensor, input: Tensor, async_op: bool = False):
        if not self.list_forms:
            return super().all_gather(output, input, async_op=async_op)
        self.counter.add("all_gather", _nbytes(output) * self._ring_fraction())
        chunks = list(output.chunk(self.world_size))
        return dist.all_gather(chunks, input, group=self.group, async_op=async_op)

    def reduce_scatter(self, output: Tensor, input: Tensor, op: str = "avg",
                       async_op: bool = False):  # fmt: skip
        if not self.list_forms:
            return super().reduce_scatter(output, input, op=op, async_op=async_op)
        self.counter.add("reduce_scatter", _nbytes(input) * self._ring_fraction())
        chunks = list(input.chunk(self.world_size))
        return dist.reduce_scatter(
            output, chunks, op=_reduce_op(op), group=self.group, async_op=async_op
        )

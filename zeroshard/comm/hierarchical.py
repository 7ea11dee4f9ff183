"""qgZ: a reduce-scatter as two quantized all-to-alls, the second one alone crossing nodes.

A plain reduce-scatter on N ranks sends each peer its chunk in full precision, and (N-L)/(N-1)
of that leaves the node (L ranks per node, M = N/L nodes). ZeRO++'s qgZ (Wang et al., 2023)
reduces within the node first, so only one partial sum per destination crosses nodes, and
quantizes both hops. Rank (n, l) (node n, local index l; global rank n·L + l):

1. intra-node all-to-all: to local peer l' it sends the chunks of ranks (·, l') (M chunks),
   blockwise-quantized; it sums, in local-rank order and in fp32, its own chunks (exact) and
   what its peers sent (dequantized): the node's partial sums for ranks (·, l);
2. inter-node all-to-all among the ranks with local index l: to node n' it sends the partial
   for (n', l), quantized again; the owner sums the M partials in node order, in fp32, and
   averages.

What crosses nodes per rank is (M-1)/M · S/L elements at `inter_bits` bits plus scales,
against (N-L)/N · S at full precision for the plain reduce-scatter (S: the input's elements).
Every sum runs in a fixed order, so the result does not depend on message arrival; it is an
approximation of the plain mean (each hop's rounding is at most half a step of its block's
scale), and an inf/nan anywhere reaches the owner as a non-finite value (comm/quantized.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from zeroshard.comm.collectives import Collectives
from zeroshard.comm.quantized import BlockwiseWire


class HierarchicalQuantizedReduce:
    """The `reduce_scatter` of `world` done as qgZ over its `intra` (node) and `inter` (same
    local index) subgroups. Other collectives stay the world's."""

    def __init__(self, world: Collectives, intra: Collectives, inter: Collectives, *,
                 intra_bits: int = 4, inter_bits: int = 4, block: int = 128) -> None:  # fmt: skip
        if intra.world_size * inter.world_size != world.world_size:
            raise ValueError(f"qgZ: {intra.world_size} ranks per node x {inter.world_size} "
                             f"nodes is not the world of {world.world_size}")  # fmt: skip
        self.world, self.intra, self.inter = world, intra, inter
        self.counter = world.counter
        self.intra_wire = BlockwiseWire(intra_bits, block)
        self.inter_wire = BlockwiseWire(inter_bits, block)
        self.in_flight: list[_Pending] = []  # launched, oldest first

    @property
    def world_size(self) -> int:
        return self.world.world_size

    @property
    def rank(self) -> int:
        return self.world.rank

    def reduce_scatter(self, output: Tensor, input: Tensor, op: str = "avg",
                       async_op: bool = False, codec: Any = None,
                       one_collective: bool = True) -> Any:  # fmt: skip
        """Chunk `rank` of the (averaged, or summed) `input` into `output`; `output` may be
        that chunk of `input`. `codec` and `one_collective` are the world's arguments, which
        this form does not need."""
        if op not in ("avg", "sum"):
            raise ValueError(f"qgZ reduces with 'avg' or 'sum', not {op!r}")
        if not self.world.active:
            return self.world.reduce_scatter(output, input, op, async_op)
        self.advance()
        pending = _Pending(self, output, input, op)
        self.in_flight.append(pending)
        if async_op:
            return pending
        pending.wait()
        return None

    def advance(self) -> None:
        """Start the inter-node hop of every reduction whose intra-node hop has landed, oldest
        first, stopping at the first still in flight: each group sees its collectives in the
        same order on every rank, and the hop overlaps backward instead of waiting for
        `wait()`."""
        self.in_flight = [p for p in self.in_flight if not p.done]
        for p in self.in_flight:
            if not p.advance():
                break

    def exchange(self, comm: Collectives, wire: BlockwiseWire, rows: Tensor) -> tuple[Any, Tensor]:
        """Send row r of `rows` (encoded) to rank r of `comm`; the received rows come back in
        rank order (the own row is not sent: its slot is left as it is)."""
        send = torch.empty(rows.shape[0], wire.wire_bytes(rows[0].numel()), dtype=torch.uint8,
                           device=rows.device)  # fmt: skip
        for r, row in enumerate(rows):
            if r != comm.rank:
                send[r].copy_(wire.encode(row))
        recv = torch.empty_like(send)
        sent = send[0].numel() * (comm.world_size - 1)
        self.counter.add("reduce_scatter", sent, calls=1, inter=sent * comm.inter_fraction)
        return comm.all_to_all(recv, send, async_op=True), recv

    def combine(self, comm: Collectives, wire: BlockwiseWire, own: Tensor, recv: Tensor,
             numel: int) -> Tensor:  # fmt: skip
        """fp32 sum in rank order of this rank's exact `own` and the peers' received rows."""
        acc = torch.zeros(numel, dtype=torch.float32, device=own.device)
        for r in range(comm.world_size):
            if r == comm.rank:
                acc.add_(own.reshape(-1))
            else:
                wire.decode(recv[r], acc, accumulate=True)
        return acc


class _Pending:
    """A qgZ reduce-scatter in flight: the intra-node hop is posted at once; once it has
    landed, the next `advance()` (or `wait()`) sums it and posts the inter-node hop; `wait()`
    sums that and writes the output."""

    def __init__(self, hq: HierarchicalQuantizedReduce, output: Tensor, input: Tensor,
                 op: str) -> None:  # fmt: skip
        self.hq, self.output, self.op = hq, output, op
        lsize, m = hq.intra.world_size, hq.inter.world_size
        self.chunk = input.numel() // hq.world_size
        grid = input.reshape(m, lsize, self.chunk)  # [node, local index, chunk]
        # own rows are read now: `output` may be one of them, and is written only at the end
        self.own = grid[:, hq.intra.rank].to(torch.float32, copy=True)
        self.work, self.recv = hq.exchange(hq.intra, hq.intra_wire, grid.transpose(0, 1))
        self.rows: Tensor | None = None  # the node's partial sums, once the first hop landed
        self.done = False

    def advance(self) -> bool:
        """Post the inter-node hop if the intra-node one has landed; True once it is posted."""
        if self.rows is None:
            landed = getattr(self.work, "is_completed", None)
            if landed is not None and not landed():
                return False
            self.second_hop()
        return True

    def second_hop(self) -> None:
        """Sum the landed intra-node hop (waiting for it) and post the inter-node one."""
        hq = self.hq
        self.work.wait()
        partial = hq.combine(hq.intra, hq.intra_wire, self.own, self.recv, self.own.numel())
        self.rows = partial.view(hq.inter.world_size, self.chunk)  # row n: for rank (n, l)
        self.work, self.recv = hq.exchange(hq.inter, hq.inter_wire, self.rows)
        self.own = None  # type: ignore[assignment]

    def wait(self) -> bool:
        if self.done:
            return True
        hq = self.hq
        for p in hq.in_flight:  # older reductions' hops first: the same order on every rank
            if p is self:
                break
            if not p.done and p.rows is None:
                p.second_hop()
        if self.rows is None:
            self.second_hop()
        assert self.rows is not None
        self.work.wait()
        total = hq.combine(hq.inter, hq.inter_wire, self.rows[hq.inter.rank], self.recv,
                           self.chunk)  # fmt: skip
        if self.op == "avg":
            total.div_(hq.world_size)
        self.output.copy_(total.view(self.output.shape))
        self.rows = self.recv = None  # type: ignore[assignment]
        self.done = True
        return True

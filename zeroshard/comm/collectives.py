"""The collectives zeroshard issues, each one counted.

Every byte a rank sends goes through this module, so `comm_report()` is measured rather than
estimated from the model size. The counts are those of the ring algorithms NCCL and gloo use
for large messages: for a tensor of S bytes on N ranks, all-reduce sends 2·S·(N-1)/N,
reduce-scatter S·(N-1)/N (S = input size) and all-gather S·(N-1)/N (S = output size).
With one rank (or no process group) nothing is sent and the calls are local no-ops.

On gloo the tensor forms of reduce-scatter and all-gather are slow (torch 2.13, 2 CPU ranks,
4M fp32 elements: `reduce_scatter_tensor` 26 ms against 20 ms for the list form over views
of the same buffer; 1M: 9.5 against 5.8 ms), so gloo gets the list form of all-gather: same
bytes, no copies (the list entries are views). gloo has no reduce-scatter of its own:
torch's (either form) is world_size all-reduces, one per chunk, of copies of the input's
chunks. One all-reduce of the whole input, in place, does it in one collective without the
copies (2 ranks, 2M fp32 elements: 4.9 ms against 7.5 ms), but it sends twice the bytes a
reduce-scatter needs. The counters keep the ring formulas above: what the algorithm needs,
not what gloo's implementation of it moves. NCCL keeps the tensor forms, which are its fast
ones.

A caller that does not need a collective to be one call (stages 1-2: a handful of large
gradient buckets and one parameter gather per step) passes `one_collective=False`, and gloo
then moves only the ring's bytes:
- a reduce-scatter is one exchange: each rank posts an `isend` of every peer's chunk to that
  peer and an `irecv` of each peer's copy of its own chunk, all at once, and sums them in
  rank order on `wait()`. Against the all-reduce of the same input (torch 2.13, fp32
  elements, ms), 2 ranks: 4k 0.13 vs 0.84, 40k 0.21 vs 3.39, 400k 0.32 vs 0.83, 4M 5.5 vs
  8.6; 4 ranks: 4k 0.61 vs 7.4, 4M 14.4 vs 21.7. It is counted as its 2·(N-1) calls.
- an all-gather is the same exchange, without the sums: this rank's chunk to every peer,
  each peer's chunk straight into its place in the output. Against one broadcast per rank
  (the form used before; 2 ranks, fp32, ms, medians of 21, two runs): 4.2M elements in one
  bucket 4.3 and 4.0 vs 4.9 and 4.5, in 3 buckets 4.7 and 3.0 vs 4.5 and 5.6, 2.1M 2.1 and
  2.0 vs 2.5 and 2.3; 4 ranks: 4.2M 8.1 vs 10.2, 8 buckets of 125k 5.1 vs 19.9.
Stage 3 keeps one collective per call: on a latency-bound model their number is what counts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import Tensor

from zeroshard.comm.pending import (
    DONE,
    AllOf,
    ChunkOnWait,
    ChunkwiseDecode,
    Decoded,
    SumOnWait,
    wait_all,
)
from zeroshard.comm.topology import NodeTopology

__all__ = ["DONE", "COLLECTIVES", "Collectives", "Comm", "CommCounter", "WireCodec", "count",
           "wait_all"]

# torch 2.13 renamed the tensor forms; keep working on older releases (setup.py: torch>=2.4).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "broadcast")
# bytes a rank sends per byte of the counted tensor, times (N-1)/N (see the module docstring)
_TAGS = 1 << 20  # point-to-point tags cycle through this many
_RING_FACTOR = {"all_reduce": 2, "reduce_scatter": 1, "all_gather": 1, "broadcast": 1}




@dataclass
class CommCounter:
    """Bytes sent by this rank and calls issued, per collective, since the last `snapshot()`.

    The report has each collective's bytes under its name and `total`, and its number of
    calls under `<name>_calls` and `calls`: on a latency-bound model the calls, not the
    bytes, set the step time. `inter_node` + `intra_node` = `total`: the bytes sent to
    ranks on other nodes and on this one (comm/topology.py)."""

    current: Counter = field(default_factory=Counter)
    calls: Counter = field(default_factory=Counter)
    inter: float = 0.0  # bytes of `current` sent to ranks on other nodes (topology.py)
    last: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, nbytes: float, calls: int = 1, inter: float = 0.0) -> None:
        """`nbytes` sent by collective `kind` in `calls` c10d calls, `inter` of them to
        ranks on other nodes."""
        self.current[kind] += int(round(nbytes))
        self.calls[kind] += calls
        self.inter += inter

    def snapshot(self) -> dict[str, int]:
        """Close the current step: its counts become `last`, and counting restarts at zero."""
        report = {k: int(self.current.get(k, 0)) for k in COLLECTIVES}
        report["total"] = sum(report.values())
        for k in COLLECTIVES:
            report[f"{k}_calls"] = int(self.calls.get(k, 0))
        report["calls"] = sum(self.calls.values())
        report["inter_node"] = min(int(round(self.inter)), report["total"])
        report["intra_node"] = report["total"] - report["inter_node"]
        self.last = report
        self.current = Counter()
        self.calls = Counter()
        self.inter = 0.0
        return report


class WireCodec(Protocol):
    """How a tensor travels: `encode` before it is sent, `decode` into the destination after
    it arrived. A codec whose encoded form can be summed (a cast to bf16/fp16) says
    `reducible`; only those may be used for all-reduce and reduce-scatter."""

    reducible: bool

    def encode(self, t: Tensor) -> Tensor: ...
    def decode(self, wire: Tensor, out: Tensor) -> None: ...


@runtime_checkable
class Collectives(Protocol):
    """The collectives a stage issues: implemented by `Comm` (torch.distributed) and by the
    estimator's `MetaComm` (counts only). `codec` changes what travels, not the result's
    place: each call still fills its output tensor."""

    rank: int
    world_size: int
    group: dist.ProcessGroup | None
    counter: CommCounter
    inter_fraction: float  # share of this rank's peers on other nodes

    @property
    def active(self) -> bool: ...
    def all_reduce(self, tensor: Tensor, op: str = "avg", async_op: bool = False,
                   codec: WireCodec | None = None) -> Any: ...  # fmt: skip
    def reduce_scatter(self, output: Tensor, input: Tensor, op: str = "avg",
                       async_op: bool = False, codec: WireCodec | None = None,
                       one_collective: bool = True) -> Any: ...  # fmt: skip
    def all_gather(self, output: Tensor, input: Tensor, async_op: bool = False,
                   codec: WireCodec | None = None,
                   one_collective: bool = True) -> Any: ...  # fmt: skip
    def all_to_all(self, output: Tensor, input: Tensor, async_op: bool = False) -> Any: ...
    def broadcast(self, tensor: Tensor, src: int = 0, codec: WireCodec | None = None,
                  counted: bool = True) -> None: ...  # fmt: skip


def count(counter: CommCounter, kind: str, tensor: Tensor, world_size: int,
          calls: int = 1, inter_fraction: float = 0.0) -> None:  # fmt: skip
    """Count what collective `kind` on `tensor` sends from one rank of `world_size` (`tensor`:
    the input of a reduce-scatter, the output of an all-gather): the one ring formula;
    `calls`: the c10d calls it took (an exchange: an isend and an irecv per peer);
    `inter_fraction`: the share of the peers on other nodes."""
    nbytes = _RING_FACTOR[kind] * _nbytes(tensor) * (world_size - 1) / world_size
    counter.add(kind, nbytes, calls, nbytes * inter_fraction)


def _reducible(codec: WireCodec) -> None:
    if not codec.reducible:
        raise ValueError(f"{type(codec).__name__} cannot be summed on the wire: use it for "
                         "all-gather and broadcast only")  # fmt: skip


class Comm:
    """A process group plus the counter its collectives report to.

    Works without `torch.distributed` being initialised (one rank), so the same optimizer
    runs in a plain single-process script.
    """

    def __init__(self, group: dist.ProcessGroup | None = None,
                 counter: CommCounter | None = None) -> None:  # fmt: skip
        """`counter`: share another `Comm`'s (a subgroup's bytes in its parent's report)."""
        self.initialized = dist.is_available() and dist.is_initialized()
        self.group = group
        self.rank = dist.get_rank(group) if self.initialized else 0
        self.world_size = dist.get_world_size(group) if self.initialized else 1
        self.counter = counter if counter is not None else CommCounter()
        self.list_forms = self.active and dist.get_backend(group) == "gloo"
        self._global_ranks = [
            dist.get_global_rank(group, r) if group is not None else r
            for r in range(self.world_size)
        ] if self.active else []  # fmt: skip
        self.inter_fraction = 0.0  # share of this rank's peers on other nodes
        if self.active:
            try:
                topology = NodeTopology.from_env(dist.get_world_size())
            except ValueError:  # uneven nodes: counted as one (only hpZ/qgZ refuse them)
                topology = NodeTopology(dist.get_world_size(), dist.get_world_size())
            self.inter_fraction = topology.inter_fraction(self._global_ranks,
                                                          dist.get_rank())  # fmt: skip
        self._tag = 0

    @property
    def global_ranks(self) -> list[int]:
        """The group's ranks in the default group's numbering, in group order (empty when
        nothing is sent: one rank)."""
        return list(self._global_ranks)

    @property
    def active(self) -> bool:
        return self.initialized and self.world_size > 1

    def record(self, kind: str, tensor: Tensor, calls: int = 1) -> None:
        count(self.counter, kind, tensor, self.world_size, calls, self.inter_fraction)

    def _coded(self, work: Any, codec: WireCodec, wire: Tensor, out: Tensor, async_op: bool):
        pending = Decoded(work if async_op else None, codec, wire, out)
        if not async_op:
            codec.decode(wire, out)
            return None
        return pending

    def all_reduce(self, tensor: Tensor, op: str = "avg", async_op: bool = False,
                   codec: WireCodec | None = None):  # fmt: skip
        """In-place all-reduce; `op` is "avg", "sum" or "max"."""
        if not self.active:
            return DONE if async_op else None
        if codec is not None:
            _reducible(codec)
            wire = codec.encode(tensor)
            work = self.all_reduce(wire, op, async_op)
            return self._coded(work, codec, wire, tensor, async_op)
        self.record("all_reduce", tensor)
        return dist.all_reduce(tensor, op=_reduce_op(op), group=self.group, async_op=async_op)

    def reduce_scatter(
        self, output: Tensor, input: Tensor, op: str = "avg", async_op: bool = False,
        codec: WireCodec | None = None, one_collective: bool = True,
    ):  # fmt: skip
        """Reduce `input` (N equal chunks) across ranks; chunk `rank` of the result lands in
        `output`, which may be that chunk of `input` itself (in place). `input`'s other
        chunks are left undefined, and so is its own chunk when out of place, but never
        half-reduced: either as they were or reduced like the output (gloo's all-reduce
        form), so a later backward may still add into them. `one_collective=False` lets gloo
        use one point-to-point exchange instead of an all-reduce."""
        if codec is not None and self.active:
            _reducible(codec)
            wire_in = codec.encode(input)
            wire_out = wire_in.chunk(self.world_size)[self.rank]
            work = self.reduce_scatter(wire_out, wire_in, op, async_op,
                                       one_collective=one_collective)  # fmt: skip
            return self._coded(work, codec, wire_out, output, async_op)
        if not self.active:
            if output.data_ptr() != input.data_ptr() or output.numel() != input.numel():
                output.copy_(input)
            return DONE if async_op else None
        if not self.list_forms:
            self.record("reduce_scatter", input)
            return _reduce_scatter_single(
                output, input, op=_reduce_op(op), group=self.group, async_op=async_op
            )
        if one_collective:  # gloo: see the module docstring
            self.record("reduce_scatter", input)
            pending = self._reduce_scatter_by_all_reduce(output, input, op)
        else:
            self.record("reduce_scatter", input, calls=2 * (self.world_size - 1))
            pending = self._reduce_scatter_by_exchange(output, input, op)
        if async_op:
            return pending
        pending.wait()
        return None

    def all_gather(self, output: Tensor, input: Tensor, async_op: bool = False,
                   codec: WireCodec | None = None, one_collective: bool = True):  # fmt: skip
        """Concatenate every rank's `input` into `output`; `input` may be this rank's chunk of
        `output` (in place). `one_collective=False` lets gloo use one point-to-point
        exchange instead."""
        if codec is not None and self.active:
            wire_in = codec.encode(input)
            wire_out = wire_in.new_empty(wire_in.numel() * self.world_size)
            work = self.all_gather(wire_out, wire_in, async_op)
            return self._coded(work, ChunkwiseDecode(codec, self.world_size), wire_out,
                               output, async_op)  # fmt: skip
        if not self.active:
            if output.data_ptr() != input.data_ptr():
                output.copy_(input)
            return DONE if async_op else None
        if self.list_forms and not one_collective:
            self.record("all_gather", output, calls=2 * (self.world_size - 1))
            return self._gather_by_exchange(output, input, async_op)
        self.record("all_gather", output)
        if self.list_forms:
            chunks = list(output.chunk(self.world_size))
            return dist.all_gather(chunks, input, group=self.group, async_op=async_op)
        return _all_gather_single(output, input, group=self.group, async_op=async_op)

    def _reduce_scatter_by_all_reduce(self, output: Tensor, input: Tensor, op: str):
        chunk = input.chunk(self.world_size)[self.rank]
        work = dist.all_reduce(input, op=_reduce_op(op), group=self.group, async_op=True)
        in_place = output.data_ptr() == chunk.data_ptr() and output.numel() == chunk.numel()
        return work if in_place else ChunkOnWait(work, chunk, output)

    def _reduce_scatter_by_exchange(self, output: Tensor, input: Tensor, op: str):
        _reduce_op(op)  # an unknown op fails here, before anything is sent
        chunks = input.chunk(self.world_size)
        own = chunks[self.rank]
        received: list[Tensor | None] = [None if r == self.rank else torch.empty_like(own)
                                         for r in range(self.world_size)]  # fmt: skip
        # Out of place, the peer among ranks 0-1 sends straight into `output` (the first two
        # terms of the rank-order sum commute): on 2 ranks no receive buffer at all.
        first = 1 if self.rank == 0 else 0
        if (output.data_ptr() != own.data_ptr() and output.is_contiguous()
                and output.shape == own.shape and output.dtype == own.dtype):  # fmt: skip
            received[first] = output
        works = self._exchange(list(chunks), received)
        return SumOnWait(works, own, received, output, op)

    def _gather_by_exchange(self, output: Tensor, input: Tensor, async_op: bool):
        chunks = output.chunk(self.world_size)
        own = chunks[self.rank]
        if own.data_ptr() != input.data_ptr():
            own.copy_(input)
        pending = AllOf(self._exchange([own] * self.world_size, list(chunks)))
        if async_op:
            return pending
        pending.wait()
        return None

    def _exchange(self, sends: list[Tensor], recvs: list[Tensor | None]) -> list[Any]:
        """Post at once, for every peer r, an isend of `sends[r]` and an irecv into
        `recvs[r]`; the pending works come back."""
        works = []
        self._tag = (self._tag + 1) % _TAGS  # concurrent exchanges never share a slot
        for r, peer in enumerate(self._global_ranks):
            if r != self.rank:
                works.append(dist.isend(sends[r], dst=peer, group=self.group, tag=self._tag))
                works.append(dist.irecv(recvs[r], src=peer, group=self.group, tag=self._tag))
        return works

    def all_to_all(self, output: Tensor, input: Tensor, async_op: bool = False) -> Any:
        """Rank r gets row `rank` of every rank's `input` (rows: dim 0) as its `output` row r.
        Not counted: its caller (comm/hierarchical.py) knows what the rows hold."""
        if not self.active:
            if output.data_ptr() != input.data_ptr():
                output.copy_(input)
            return DONE if async_op else None
        return dist.all_to_all_single(output, input, group=self.group, async_op=async_op)

    def broadcast(self, tensor: Tensor, src: int = 0, codec: WireCodec | None = None,
                  counted: bool = True) -> None:  # fmt: skip
        """Broadcast from group rank `src` (a group-local rank, like every rank here);
        `counted=False` for set-up traffic that is no training step's (initial weights)."""
        if not self.active:
            return
        if codec is not None:
            wire = codec.encode(tensor)
            self.broadcast(wire, src, counted=counted)
            codec.decode(wire, tensor)
            return
        if counted:
            self.record("broadcast", tensor)
        global_src = dist.get_global_rank(self.group, src) if self.group is not None else src
        dist.broadcast(tensor, src=global_src, group=self.group)


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _reduce_op(op: str) -> dist.ReduceOp:
    try:
        return {"avg": dist.ReduceOp.AVG, "sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    except KeyError:
        raise ValueError(f"reduce op must be 'avg', 'sum' or 'max', got {op!r}") from None

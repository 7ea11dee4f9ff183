"""The collectives zeroshard issues, each one counted.

Every byte a rank sends goes through this module, so `comm_report()` is measured rather than
estimated from the model size. The counts are those of the ring algorithms NCCL and gloo use
for large messages: for a tensor of S bytes on N ranks, all-reduce sends 2·S·(N-1)/N,
reduce-scatter S·(N-1)/N (S = input size) and all-gather S·(N-1)/N (S = output size).
With one rank (or no process group) nothing is sent and the calls are local no-ops.

On gloo the tensor forms of reduce-scatter and all-gather are slow (torch 2.13, 2 CPU ranks,
4M fp32 elements: `reduce_scatter_tensor` 26 ms against 20 ms for the list form over views
of the same buffer; 1M: 9.5 against 5.8 ms), so gloo gets the list forms: same bytes, no
copies (the list entries are views). NCCL keeps the tensor forms, which are its fast ones.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch.distributed as dist
from torch import Tensor

# torch 2.13 renamed the tensor forms; keep working on older releases (setup.py: torch>=2.4).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "broadcast")
# bytes a rank sends per byte of the counted tensor, times (N-1)/N (see the module docstring)
_RING_FACTOR = {"all_reduce": 2, "reduce_scatter": 1, "all_gather": 1, "broadcast": 1}


class _DoneWork:
    """Stands in for a `dist.Work` when there was nothing to communicate."""

    def wait(self) -> bool:
        return True


DONE = _DoneWork()


@dataclass
class CommCounter:
    """Bytes sent by this rank, per collective, since the last `snapshot()`."""

    current: Counter = field(default_factory=Counter)
    last: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, nbytes: float) -> None:
        self.current[kind] += int(round(nbytes))

    def snapshot(self) -> dict[str, int]:
        """Close the current step: its counts become `last`, and counting restarts at zero."""
        report = {k: int(self.current.get(k, 0)) for k in COLLECTIVES}
        report["total"] = sum(report.values())
        self.last = report
        self.current = Counter()
        return report


class Comm:
    """A process group plus the counter its collectives report to.

    Works without `torch.distributed` being initialised (one rank), so the same optimizer
    runs in a plain single-process script.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.initialized = dist.is_available() and dist.is_initialized()
        self.group = group
        self.rank = dist.get_rank(group) if self.initialized else 0
        self.world_size = dist.get_world_size(group) if self.initialized else 1
        self.counter = CommCounter()
        self.list_forms = self.active and dist.get_backend(group) == "gloo"

    @property
    def active(self) -> bool:
        return self.initialized and self.world_size > 1

    def _ring_fraction(self) -> float:
        return (self.world_size - 1) / self.world_size

    def record(self, kind: str, tensor: Tensor) -> None:
        """Count what collective `kind` on `tensor` sends from this rank (`tensor`: the input
        of a reduce-scatter, the output of an all-gather)."""
        self.counter.add(kind, _RING_FACTOR[kind] * _nbytes(tensor) * self._ring_fraction())

    def all_reduce(self, tensor: Tensor, op: str = "avg", async_op: bool = False):
        """In-place all-reduce; `op` is "avg", "sum" or "max"."""
        if not self.active:
            return DONE if async_op else None
        self.record("all_reduce", tensor)
        return dist.all_reduce(tensor, op=_reduce_op(op), group=self.group, async_op=async_op)

    def reduce_scatter(
        self, output: Tensor, input: Tensor, op: str = "avg", async_op: bool = False
    ):
        """Reduce `input` (N equal chunks) across ranks; chunk `rank` of the result lands in
        `output`, which may be that chunk of `input` itself (in place)."""
        if not self.active:
            if output.data_ptr() != input.data_ptr() or output.numel() != input.numel():
                output.copy_(input)
            return DONE if async_op else None
        self.record("reduce_scatter", input)
        if self.list_forms:
            chunks = list(input.chunk(self.world_size))
            return dist.reduce_scatter(
                output, chunks, op=_reduce_op(op), group=self.group, async_op=async_op
            )
        return _reduce_scatter_single(
            output, input, op=_reduce_op(op), group=self.group, async_op=async_op
        )

    def all_gather(self, output: Tensor, input: Tensor, async_op: bool = False):
        """Concatenate every rank's `input` into `output`; `input` may be this rank's chunk of
        `output` (in place)."""
        if not self.active:
            if output.data_ptr() != input.data_ptr():
                output.copy_(input)
            return DONE if async_op else None
        self.record("all_gather", output)
        if self.list_forms:
            chunks = list(output.chunk(self.world_size))
            return dist.all_gather(chunks, input, group=self.group, async_op=async_op)
        return _all_gather_single(output, input, group=self.group, async_op=async_op)

    def broadcast(self, tensor: Tensor, src: int = 0) -> None:
        """Broadcast from group rank `src` (a group-local rank, like every rank here)."""
        if not self.active:
            return
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


def wait_all(works: list) -> None:
    for w in works:
        if w is not None:
            w.wait()
    works.clear()


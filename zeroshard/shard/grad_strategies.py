"""How each stage reduces a bucket of gradients: one small strategy per stage.

`GradReducer` (grad_reducer.py) owns what every stage shares (hooks, bucket readiness, the
agreed launch order, the in-flight queue); a strategy owns where the gradient lives and which
collective averages it:

- `ReplicatedAllReduce` (stage 0): a full-size gradient buffer, all-reduced in place;
- `ReduceToOwnChunk` (stage 1): a full-size buffer, reduce-scattered so this rank's chunk holds
  the averaged gradient of the parameters it updates (out of place during backward: the raw
  local sums stay intact for an undeclared second backward; `finish` copies the result in);
- `ReduceToGradShard` (stage 2): only this rank's gradient shard; each bucket's gradients collect
  in a recycled bucket buffer that is reduce-scattered straight into the shard.

Every strategy hands each reduced range to `landed` (when a placement watches the reducer)
right after the reduction lands there, in completion order: stage 0 the all-reduced bucket,
stage 1 its own chunk (with the temporary that holds it until `finish`), stage 2 the shard
piece after any add into it.

Stage 3 (sharded parameters) keeps its gradients in the units: stage3/sharding.py adapts the
engine to the same `GradPath` protocol the optimizer talks to.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch
from torch import Tensor

from zeroshard.comm.collectives import Comm
from zeroshard.comm.inflight import MAX_IN_FLIGHT, InFlight
from zeroshard.shard.flat_buffer import Bucket, FlatParams, Slot


class BucketState:
    """One bucket's progress through a backward (shared by every strategy)."""

    __slots__ = (
        "index", "flat", "bucket", "fired", "dirty", "launched", "buffer", "wrote_shard", "reduced"
    )  # fmt: skip

    def __init__(self, index: int, flat: int, bucket: Bucket) -> None:
        self.index = index  # position among all buckets of the reducer
        self.flat = flat
        self.bucket = bucket
        self.fired: set[int] = set()
        self.dirty = False  # holds gradient not yet reduced
        self.launched = False  # reduced at least once since the last step
        self.buffer: Tensor | None = None  # stage 2: the bucket's full-size gradients
        self.wrote_shard = False  # stage 2: shard already holds reduced gradient this step
        self.reduced: Tensor | None = None  # stage 1: averaged chunk waiting for finish()

    @property
    def ready(self) -> bool:
        return len(self.fired) == len(self.bucket.slots)


class _Strategy(abc.ABC):
    """What differs per stage; `flats` and `queue` are the reducer's own (shared) objects."""

    sharded = True  # gradients on different ranks are disjoint (their norms add up)

    def __init__(self, comm: Comm, queue: InFlight, flats: list[FlatParams]) -> None:
        self.comm = comm
        self.queue = queue
        self.flats = flats
        self.grads: list[Tensor] = []  # per FlatParams: the gradient tensor this rank keeps
        # called with (range of `grads`, temporary holding its value or None) as each
        # reduction lands; set by `GradReducer.watch`
        self.landed: Callable[[Tensor, Tensor | None], object] | None = None

    def launches_in_backward(self, overlap_comm: bool, accumulation_steps: int) -> bool:
        # Stages 0-1 stay exact if backward runs again before the step, but reducing during
        # backward only pays when every backward ends an accumulation cycle.
        return overlap_comm and accumulation_steps == 1

    def add(self, flat: FlatParams, dtype: torch.dtype) -> None:
        self.grads.append(torch.zeros(flat.numel, dtype=dtype, device=flat.device))

    def accumulate(self, fi: int, slot: Slot, state: BucketState, grad: Tensor) -> None:
        self.queue.wait_for(state)  # its last reduction may still be reading this bucket
        self.flats[fi].param_view(self.grads[fi], slot).add_(grad.reshape(-1))

    def bound_in_flight(self, in_backward: bool) -> None:
        """With a watcher, reductions land during backward: at most MAX_IN_FLIGHT stay in
        flight (without one, stages 0-1 let them all run until `finish`)."""
        if in_backward and self.landed is not None:
            self.queue.wait_below(MAX_IN_FLIGHT)

    @abc.abstractmethod
    def launch(self, state: BucketState, in_backward: bool, overlap_comm: bool) -> None:
        """Start reducing a ready bucket (each stage's own collective)."""

    def after_finish(self, states: list[BucketState]) -> None:  # noqa: B027 (a no-op hook)
        """After `finish()` drained the queue (stage 1 copies reduced chunks in)."""

    def grad_pieces(self, fi: int) -> list[Tensor]:
        """This rank's averaged gradients, aligned with `FlatParams.own_chunks`."""
        return self.flats[fi].own_chunks(self.grads[fi])

    def end_step(self) -> None:  # noqa: B027 (a no-op hook)
        """The step is over (stage 2 frees its idle bucket buffers)."""

    def held_buffers(self, states: list[BucketState]) -> list[Tensor]:
        return [s.reduced for s in states if s.reduced is not None]


class ReplicatedAllReduce(_Strategy):
    """Stage 0: every rank keeps and updates everything."""

    sharded = False

    def launch(self, state: BucketState, in_backward: bool, overlap_comm: bool) -> None:
        flat = self.flats[state.flat]
        full = flat.bucket_view(self.grads[state.flat], state.bucket)
        landed = self.landed
        done = None if landed is None else (lambda: landed(full, None))
        self.queue.add(self.comm.all_reduce(full, async_op=True), tag=state, on_done=done)
        self.bound_in_flight(in_backward)


class ReduceToOwnChunk(_Strategy):
    """Stage 1: full gradients, reduce-scattered; this rank reads its chunk."""

    def launch(self, state: BucketState, in_backward: bool, overlap_comm: bool) -> None:
        fi, b = state.flat, state.bucket
        flat = self.flats[fi]
        full = flat.bucket_view(self.grads[fi], b)
        own = self.grads[fi][slice(*b.chunk_range(flat.shard))]
        # during backward: out of place (see the module docstring); at finish: in place
        temp = torch.empty_like(own) if in_backward else None
        self.queue.wait_for(state)  # an older result must not land after this one
        state.reduced = None
        work = self.comm.reduce_scatter(own if temp is None else temp, full, async_op=True,
                                        one_collective=False)  # fmt: skip

        landed = self.landed

        def done() -> None:
            if temp is not None:
                state.reduced = temp  # the averaged chunk waits for finish()
            if landed is not None:
                landed(own, temp)

        self.queue.add(work, tag=state, held=(temp,), on_done=done)
        self.bound_in_flight(in_backward)

    def after_finish(self, states: list[BucketState]) -> None:
        for state in states:
            if state.reduced is not None:
                flat = self.flats[state.flat]
                lo, hi = state.bucket.chunk_range(flat.shard)
                self.grads[state.flat][lo:hi].copy_(state.reduced)
                state.reduced = None


class ReduceToGradShard(_Strategy):
    """Stage 2: only this rank's gradient shard is kept; buckets are reduce-scattered into it
    during backward, their buffers recycled for later buckets."""

    def __init__(self, comm: Comm, queue: InFlight, flats: list[FlatParams]) -> None:
        super().__init__(comm, queue, flats)
        self.pool: list[Tensor] = []  # idle bucket buffers

    def launches_in_backward(self, overlap_comm: bool, accumulation_steps: int) -> bool:
        return True

    def add(self, flat: FlatParams, dtype: torch.dtype) -> None:
        self.grads.append(torch.zeros(flat.shard_numel, dtype=dtype, device=flat.device))

    def accumulate(self, fi: int, slot: Slot, state: BucketState, grad: Tensor) -> None:
        if state.buffer is None:
            state.buffer = self._bucket_buffer(fi, state.bucket)
        lo = slot.offset - state.bucket.start
        state.buffer[lo : lo + slot.numel].add_(grad.reshape(-1))

    def _bucket_buffer(self, fi: int, bucket: Bucket) -> Tensor:
        """A zeroed full-size gradient buffer for `bucket`, recycled from the pool if one fits."""
        dtype = self.grads[fi].dtype
        for i, buf in enumerate(self.pool):
            if buf.dtype == dtype and buf.numel() >= bucket.numel:
                self.pool.pop(i)
                return buf[: bucket.numel].zero_()
        return torch.zeros(bucket.numel, dtype=dtype, device=self.flats[fi].device)

    def launch(self, state: BucketState, in_backward: bool, overlap_comm: bool) -> None:
        fi, b = state.flat, state.bucket
        if state.buffer is None:  # no gradient here on this rank: contribute zeros
            state.buffer = self._bucket_buffer(fi, b)
        piece = self.grads[fi][b.shard_offset : b.shard_offset + b.chunk]
        # The first reduction of a step writes the shard directly; later ones (gradient
        # accumulation) land in a temporary and are added.
        out = torch.empty_like(piece) if state.wrote_shard else piece
        buffer = state.buffer
        work = self.comm.reduce_scatter(out, buffer, async_op=True, one_collective=False)
        landed = self.landed

        def done() -> None:
            if len(self.pool) <= MAX_IN_FLIGHT:
                self.pool.append(buffer)
            if out is not piece:
                piece.add_(out)
            if landed is not None:
                landed(piece, None)

        self.queue.add(work, tag=state, held=(None if out is piece else out, buffer),
                       on_done=done)  # fmt: skip
        state.wrote_shard = True
        state.buffer = None  # the in-flight entry holds it until the wait
        # without overlap_comm each bucket is finished before backward goes on
        self.queue.wait_below(MAX_IN_FLIGHT if overlap_comm else 0)

    def grad_pieces(self, fi: int) -> list[Tensor]:
        return self.flats[fi].split_shard(self.grads[fi])

    def end_step(self) -> None:
        self.pool.clear()

    def held_buffers(self, states: list[BucketState]) -> list[Tensor]:
        return [s.buffer for s in states if s.buffer is not None] + list(self.pool)


STRATEGIES: dict[int, type[_Strategy]] = {
    0: ReplicatedAllReduce,
    1: ReduceToOwnChunk,
    2: ReduceToGradShard,
}

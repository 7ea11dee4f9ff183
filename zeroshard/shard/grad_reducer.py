"""Where gradients go: from `param.grad` into flat buffers, then averaged across ranks.

The per-stage part (which buffer, which collective) is a strategy in grad_strategies.py; this
module holds what every stage shares, and `GradPath`, the protocol the optimizer talks to.

A post-accumulate-grad hook on every trainable parameter moves its fresh `.grad` into a flat
buffer and frees it, so autograd never holds more than one parameter's full gradient:

- stage 0 and 1: a full-size flat gradient buffer per FlatParams (the ZeRO formula's 2Ψ/4Ψ of
  gradients). Stage 0 all-reduces it in buckets; stage 1 reduce-scatters each bucket, so this
  rank's chunk of the buffer ends up holding the averaged gradient of the params it updates
  (only that chunk is read afterwards). When every backward ends a step
  (gradient_accumulation_steps 1, overlap_comm) both reduce during backward; stage 1 then
  reduces into a temporary chunk copied in by `finish()`, so the raw local sums stay intact and
  a second backward before the step (accumulation nobody declared) still comes out exact.
- stage 2: the gradient lives only as this rank's shard. Each bucket's gradients collect in a
  bucket buffer; once every parameter in it has reported, the bucket is reduce-scattered
  straight into the shard, overlapped with the rest of backward, and the buffer is recycled
  for a later bucket of the same backward (saving an allocation and its page faults per
  bucket); idle buffers are freed when the step ends, so between steps none are held.

Collectives must be issued in the same order on every rank. Buckets are launched in a fixed
order: on the first step nothing is launched during backward; `finish()` records the order
in which rank 0's buckets became ready, broadcasts it, and from then on buckets are launched
in that order as they become ready (a bucket waits for those before it). Buckets whose
parameters got no gradient (unused in this forward) are flushed by `finish()`, which the
optimizer calls before it reads gradients, so an unused parameter never hangs a step.

A placement that copies gradients elsewhere (host offload) can `watch` the reducer: each
bucket's reduced range is handed to it as the reduction lands (`GradLanding.grads_landed`),
and while one watches, stages 0-1 keep at most `MAX_IN_FLIGHT` reductions in flight during
backward as stage 2 does, so buckets land (and are copied) while backward goes on, not all
at `finish()`.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from zeroshard import guards
from zeroshard.comm.collectives import Comm
from zeroshard.comm.inflight import InFlight
from zeroshard.precision import default_reduce_dtype
from zeroshard.shard.flat_buffer import FlatParams, Slot
from zeroshard.shard.grad_strategies import STRATEGIES, BucketState
from zeroshard.shard.placement import GradLanding


class GradPath(Protocol):
    """What `ZeroOptimizer.step` needs from a stage's gradient path (stages 0-3)."""

    sharded: bool  # gradients on different ranks are disjoint (their norms add up)

    def finish(self) -> None: ...
    def end_step(self) -> None: ...
    def zero_grad(self) -> None: ...
    def held_tensors(self) -> dict[str, list[Tensor]]: ...
    def watch(self, listener: GradLanding) -> None:
        """Tell `listener` of every reduced range as it lands, and before buffers are zeroed."""
        ...


class GradReducer:
    """Collects gradients into flat buffers and reduces them across ranks (stages 0-2)."""

    def __init__(
        self,
        comm: Comm,
        stage: int,
        reduce_dtype: torch.dtype | None,
        overlap_comm: bool = True,
        accumulation_steps: int = 1,
    ) -> None:
        if stage not in STRATEGIES:
            raise ValueError(f"GradReducer handles stages 0, 1 and 2, got {stage}")
        self.comm = comm
        self.reduce_dtype = reduce_dtype
        self.overlap_comm = overlap_comm
        self.accumulation_steps = accumulation_steps
        self.flats: list[FlatParams] = []
        self.queue = InFlight()
        self._handles: list = []
        self.strategy = STRATEGIES[stage](comm, self.queue, self.flats)
        self.sharded = self.strategy.sharded
        self._launches_in_backward = self.strategy.launches_in_backward(
            overlap_comm, accumulation_steps
        )
        self._states: list[BucketState] = []
        self._order: list[int] | None = None  # launch order, as indices into _states
        self._next = 0  # position in _order of the next bucket to launch during backward
        self._completed: list[int] = []  # readiness order seen on the first step
        self.listener: GradLanding | None = None  # told of each landed bucket (offload)

    # -- setup ----------------------------------------------------------------------------
    def add(self, flat: FlatParams) -> None:
        """Start managing the gradients of one FlatParams."""
        fi = len(self.flats)
        self.flats.append(flat)
        # each dtype's own default unless one was asked for
        self.strategy.add(flat, self.reduce_dtype or default_reduce_dtype(flat.dtype))
        first_state = len(self._states)
        for b in flat.buckets:
            self._states.append(BucketState(len(self._states), fi, b))
        for slot in flat.slots:
            state = self._states[first_state + slot.bucket]
            handle = slot.param.register_post_accumulate_grad_hook(
                lambda p, _fi=fi, _slot=slot, _st=state: self._on_grad(p, _fi, _slot, _st)
            )
            guards.track_hook(slot.param, handle)  # removed if the optimizer dies
            self._handles.append(handle)
        self._order = None  # a new set of buckets: record the launch order again
        self._completed.clear()

    def watch(self, listener: GradLanding) -> None:
        """Hand every reduced bucket range to `listener` as it lands (a host offload copies
        it in behind the rest of backward), and tell it before the buffers are zeroed."""
        self.listener = listener
        self.strategy.landed = listener.grads_landed

    def remove(self) -> None:
        """Take the gradient hooks off the parameters (the estimator's planning run)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- backward -------------------------------------------------------------------------
    def _on_grad(self, param: Tensor, fi: int, slot: Slot, state: BucketState) -> None:
        grad = param.grad
        if grad is None:
            return
        with torch.no_grad():
            self.strategy.accumulate(fi, slot, state, grad)
        param.grad = None
        state.dirty = True
        if slot.index not in state.fired:
            state.fired.add(slot.index)
            if state.ready:
                if self._order is None:
                    self._completed.append(state.index)
                elif self._launches_in_backward:
                    self._launch_ready()

    def _launch_ready(self) -> None:
        order = self._order
        while self._next < len(order) and self._states[order[self._next]].ready:
            self._launch(self._states[order[self._next]])
            self._next += 1
        if self._next == len(order):
            self._next = 0

    def _launch(self, state: BucketState, in_backward: bool = True) -> None:
        state.fired.clear()
        state.dirty = False
        state.launched = True
        self.strategy.launch(state, in_backward, self.overlap_comm)

    # -- step -----------------------------------------------------------------------------
    def finish(self) -> None:
        """Reduce every gradient not reduced yet, in the agreed order, and wait for all of it.
        Called by the optimizer before it reads gradients; idempotent until the next backward."""
        if self._order is None:
            self._agree_order()
        for i in self._order:
            state = self._states[i]
            if state.dirty or not state.launched:
                self._launch(state, in_backward=False)
        self.queue.drain()
        self.strategy.after_finish(self._states)
        self._next = 0

    def _agree_order(self) -> None:
        """Rank 0's readiness order becomes everyone's launch order (one small broadcast)."""
        seen = list(dict.fromkeys(self._completed))
        order = seen + [i for i in range(len(self._states)) if i not in set(seen)]
        device = self.flats[0].device if self.flats else torch.device("cpu")
        t = torch.tensor(order, dtype=torch.int64, device=device)
        self.comm.broadcast(t, src=0)
        self._order = t.tolist()

    def end_step(self) -> None:
        """After the optimizer consumed the gradients: the next backward starts a new step."""
        for s in self._states:
            s.launched = False
        self.strategy.end_step()

    def zero_grad(self) -> None:
        # Gradients thrown away before a step may still be in flight: let those reductions
        # land first, or they would write into (or read from) the buffers zeroed below.
        self.queue.drain()
        if self.listener is not None:  # its copies still reading the buffers finish first
            self.listener.grads_reset()
        for t in self.strategy.grads:
            t.zero_()
        for s in self._states:
            s.wrote_shard = False
            s.dirty = False
            s.fired.clear()
            s.buffer = None
            s.reduced = None

    # -- what the optimizer reads -----------------------------------------------------------
    def grad_pieces(self, fi: int) -> list[Tensor]:
        """This rank's averaged gradients for FlatParams `fi`, one piece per bucket, aligned
        with `FlatParams.own_chunks` of the parameters."""
        return self.strategy.grad_pieces(fi)

    def held_tensors(self) -> dict[str, list[Tensor]]:
        """Tensors this reducer holds, for the memory report."""
        buffers = self.strategy.held_buffers(self._states) + self.queue.held_tensors()
        return {"grads": list(self.strategy.grads), "comm_buffers": buffers}

"""Where gradients go: from `param.grad` into flat buffers, then averaged across ranks.

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
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import guards
from .collectives import Comm
from .flat_buffer import Bucket, FlatParams, Slot
from .precision import default_reduce_dtype

# Stage 2 keeps at most this many buckets in flight before waiting on the oldest
# (double buffering, as DeepSpeed does with overlap_comm).
MAX_IN_FLIGHT = 2


class _BucketState:
    __slots__ = (
        "index", "flat", "bucket", "fired", "dirty", "launched", "buffer", "wrote_shard", "reduced"
    )

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
        if stage not in (0, 1, 2):
            raise ValueError(f"GradReducer handles stages 0, 1 and 2, got {stage}")
        self.comm = comm
        self.stage = stage
        self.reduce_dtype = reduce_dtype
        self.overlap_comm = overlap_comm
        self.accumulation_steps = accumulation_steps
        self.flats: list[FlatParams] = []
        self.grad_flat: list[Tensor | None] = []  # stages 0-1: full-size gradient buffers
        self.grad_shard: list[Tensor | None] = []  # stage 2: this rank's gradient shard
        self._states: list[_BucketState] = []
        self._order: list[int] | None = None  # launch order, as indices into _states
        self._next = 0  # position in _order of the next bucket to launch during backward
        self._completed: list[int] = []  # readiness order seen on the first step
        # (work, bucket, temporary output to add into the shard, bucket buffer to recycle)
        self._in_flight: list[tuple[object, _BucketState, Tensor | None, Tensor | None]] = []
        self._pool: list[Tensor] = []  # stage 2: idle bucket buffers

    # -- setup ----------------------------------------------------------------------------
    def add(self, flat: FlatParams) -> None:
        """Start managing the gradients of one FlatParams."""
        fi = len(self.flats)
        self.flats.append(flat)
        # each dtype's own default unless one was asked for
        dtype = self.reduce_dtype or default_reduce_dtype(flat.dtype)
        if self.stage == 2:
            self.grad_flat.append(None)
            self.grad_shard.append(torch.zeros(flat.shard_numel, dtype=dtype, device=flat.device))
        else:
            self.grad_flat.append(torch.zeros(flat.numel, dtype=dtype, device=flat.device))
            self.grad_shard.append(None)
        first_state = len(self._states)
        for b in flat.buckets:
            self._states.append(_BucketState(len(self._states), fi, b))
        for slot in flat.slots:
            state = self._states[first_state + slot.bucket]
            handle = slot.param.register_post_accumulate_grad_hook(
                lambda p, _fi=fi, _slot=slot, _st=state: self._on_grad(p, _fi, _slot, _st)
            )
            guards.track_hook(slot.param, handle)  # issue 8: removed if the optimizer dies
        self._order = None  # a new set of buckets: record the launch order again
        self._completed.clear()

    # -- backward -------------------------------------------------------------------------
    def _on_grad(self, param: Tensor, fi: int, slot: Slot, state: _BucketState) -> None:
        grad = param.grad
        if grad is None:
            return
        flat = self.flats[fi]
        with torch.no_grad():
            if self.stage == 2:
                if state.buffer is None:
                    state.buffer = self._bucket_buffer(fi, state.bucket)
                lo = slot.offset - state.bucket.start
                state.buffer[lo : lo + slot.numel].add_(grad.reshape(-1))
            else:
                self._wait_for(state)  # its last reduction may still be reading this bucket
                flat.param_view(self.grad_flat[fi], slot).add_(grad.reshape(-1))
        param.grad = None
        state.dirty = True
        if slot.index not in state.fired:
            state.fired.add(slot.index)
            if state.ready:
                if self._order is None:
                    self._completed.append(state.index)
                elif self._launches_in_backward:
                    self._launch_ready()

    @property
    def _launches_in_backward(self) -> bool:
        if self.stage == 2:
            return True
        # Stages 0-1 stay exact if backward runs again before the step (stage 0 all-reduces in
        # place, which is linear; stage 1 reduces out of place), but reducing during backward
        # only pays when every backward ends an accumulation cycle.
        return self.overlap_comm and self.accumulation_steps == 1

    def _launch_ready(self) -> None:
        order = self._order
        while self._next < len(order) and self._states[order[self._next]].ready:
            self._launch(self._states[order[self._next]])
            self._next += 1
        if self._next == len(order):
            self._next = 0

    def _launch(self, state: _BucketState, in_backward: bool = True) -> None:
        fi, b = state.flat, state.bucket
        flat = self.flats[fi]
        state.fired.clear()
        state.dirty = False
        state.launched = True
        if self.stage == 2:
            if state.buffer is None:  # no gradient here on this rank: contribute zeros
                state.buffer = self._bucket_buffer(fi, b)
            piece = self.grad_shard[fi][b.shard_offset : b.shard_offset + b.chunk]
            # The first reduction of a step writes the shard directly; later ones (gradient
            # accumulation) land in a temporary and are added.
            out = torch.empty_like(piece) if state.wrote_shard else piece
            work = self.comm.reduce_scatter(out, state.buffer, async_op=True)
            self._in_flight.append((work, state, None if out is piece else out, state.buffer))
            state.wrote_shard = True
            state.buffer = None  # the in-flight entry holds it until the wait
            # without overlap_comm each bucket is finished before backward goes on
            limit = MAX_IN_FLIGHT if self.overlap_comm else 0
            while len(self._in_flight) > limit:
                self._complete_oldest()
        else:
            full = flat.bucket_view(self.grad_flat[fi], b)
            if self.stage == 0:
                work = self.comm.all_reduce(full, async_op=True)
                self._in_flight.append((work, state, None, None))
            else:
                lo, hi = b.chunk_range(flat.shard)
                own = self.grad_flat[fi][lo:hi]
                # during backward: out of place (see the module docstring); at finish: in place
                temp = torch.empty_like(own) if in_backward else None
                self._wait_for(state)  # an older result must not land after this one
                state.reduced = None
                work = self.comm.reduce_scatter(own if temp is None else temp, full, async_op=True)
                self._in_flight.append((work, state, temp, None))

    def _bucket_buffer(self, fi: int, bucket: Bucket) -> Tensor:
        """A zeroed full-size gradient buffer for `bucket`, recycled from the pool if one fits."""
        dtype = self.grad_shard[fi].dtype
        for i, buf in enumerate(self._pool):
            if buf.dtype == dtype and buf.numel() >= bucket.numel:
                self._pool.pop(i)
                return buf[: bucket.numel].zero_()
        return torch.zeros(bucket.numel, dtype=dtype, device=self.flats[fi].device)

    def _complete_oldest(self) -> None:
        work, state, temp, buffer = self._in_flight.pop(0)
        work.wait()
        if buffer is not None and len(self._pool) <= MAX_IN_FLIGHT:
            self._pool.append(buffer)
        if temp is not None and self.stage == 2:
            b = state.bucket
            self.grad_shard[state.flat][b.shard_offset : b.shard_offset + b.chunk].add_(temp)
        elif temp is not None:  # stage 1: the averaged chunk waits for finish()
            state.reduced = temp

    def _wait_for(self, state: _BucketState) -> None:
        while any(entry[1] is state for entry in self._in_flight):
            self._complete_oldest()

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
        while self._in_flight:
            self._complete_oldest()
        for state in self._states:
            if state.reduced is not None:
                flat = self.flats[state.flat]
                lo, hi = state.bucket.chunk_range(flat.shard)
                self.grad_flat[state.flat][lo:hi].copy_(state.reduced)
                state.reduced = None
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
        self._pool.clear()

    def zero_grad(self) -> None:
        for t in self.grad_flat + self.grad_shard:
            if t is not None:
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
        flat = self.flats[fi]
        if self.stage == 2:
            return flat.split_shard(self.grad_shard[fi])
        return flat.own_chunks(self.grad_flat[fi])

    def held_tensors(self) -> dict[str, list[Tensor]]:
        """Tensors this reducer holds, for the memory report."""
        grads = [t for t in self.grad_flat + self.grad_shard if t is not None]
        buffers = [t for s in self._states for t in (s.buffer, s.reduced) if t is not None]
        buffers += [t for entry in self._in_flight for t in entry[2:] if t is not None]
        buffers += self._pool
        return {"grads": grads, "comm_buffers": buffers}

"""Several stage-3 units in one collective: gathers and gradient reductions, coalesced.

On a latency-bound model the step time is set by the number of collectives, not their
bytes (2 gloo ranks: a 16-layer d-64 GPT ran 8-11x slower at stage 3 than at stage 2 with
the same bytes, one collective per module). So:

- `SharedGather`: consecutive released units in the recorded order are all-gathered in one
  collective into a rank-major buffer ([rank 0: unit A's chunks, unit B's chunks | rank 1:
  ...]); each unit copies its part into its own full buffer when it is first waited for.
  The buffer lives until every member has taken its part, so a coalesced gather costs at
  most its own size (<= one prefetch bucket) on top of what the units hold.
- `GradBatcher`: units whose gradients are complete wait in a batch until it would exceed
  `reduce_bucket_size` elements; the batch is copied into one rank-major buffer and
  reduce-scattered in one collective (async, queued in `InFlight`), and each unit's slice of
  the result lands in its gradient shard; `on_landed` callbacks (a host offload) get each
  landed range.

A batch or gather of one unit uses the unit's own per-bucket collectives (no copy).
Units of different dtypes or devices never share a collective.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from zeroshard.comm.collectives import Collectives, WireCodec
from zeroshard.comm.inflight import InFlight
from zeroshard.stage3.unit import RELEASED, GatherTracker, ShardedUnit
from zeroshard.stage3.zeropp import OFF, ZeroPP


def _same_kind(units: Sequence[ShardedUnit]) -> list[list[ShardedUnit]]:
    """Consecutive runs of units with one dtype and device."""
    runs: list[list[ShardedUnit]] = []
    for u in units:
        if runs and (runs[-1][0].dtype, runs[-1][0].device) == (u.dtype, u.device):
            runs[-1].append(u)
        else:
            runs.append([u])
    return runs


def _copy_rows(rows: Tensor, offset: int, unit: ShardedUnit, full: Tensor, into_rows: bool
               ) -> None:  # fmt: skip
    """Between a rank-major buffer viewed as (ranks, shard) and a unit's bucket-major flat
    buffer: bucket b's chunk of rank r sits at rows[r, offset + b.shard_offset]."""
    n = rows.shape[0]
    for b in unit.buckets:
        lo = offset + b.shard_offset
        flat = full[b.start : b.start + b.numel].view(n, b.chunk)
        if into_rows:
            rows[:, lo : lo + b.chunk].copy_(flat)
        else:
            flat.copy_(rows[:, lo : lo + b.chunk])


class SharedGather:
    """One all-gather for several units' shards; each unit takes its part on `wait()`.

    From the world (`comm`, each unit's shard pieces, sent through `codec`: qwZ), or, with
    `from_secondary`, from the hpZ group (`comm` is that group; each unit's secondary shard,
    a contiguous 1/P of its flat buffer)."""

    def __init__(self, units: Sequence[ShardedUnit], comm: Collectives,
                 tracker: GatherTracker | None, codec: WireCodec | None = None,
                 from_secondary: bool = False) -> None:  # fmt: skip
        n, rank = comm.world_size, comm.rank
        self.from_secondary = from_secondary
        self.exact = (all(u.secondary_exact for u in units) if from_secondary
                      else codec is None)  # fmt: skip
        sources = [[u.secondary] if from_secondary else u.shard_pieces for u in units]
        self.offsets: dict[int, int] = {}
        size = 0
        for u, src in zip(units, sources):
            self.offsets[id(u)] = size
            size += sum(p.numel() for p in src)
        self.rows_numel = size
        self.tracker = tracker
        self.buffer: Tensor | None = torch.empty(n * size, dtype=units[0].dtype,
                                                 device=units[0].device)  # fmt: skip
        self.nbytes = self.buffer.numel() * self.buffer.element_size()
        own = self.buffer[rank * size : (rank + 1) * size]
        pieces = [p for src in sources for p in src]
        # copy_ piece by piece: a shard kept in host memory (offload_param) lands on the
        # device here, which torch.cat(out=) across devices would refuse
        for dst, src in zip(own.split([p.numel() for p in pieces]), pieces):
            dst.copy_(src, non_blocking=dst.is_cuda)
        self.work = comm.all_gather(self.buffer, own, async_op=True, codec=codec)
        if tracker is not None:
            tracker.add(self.nbytes)
        self.left = set(self.offsets)

    def fill(self, unit: ShardedUnit, full: Tensor) -> None:
        """Wait for the collective and copy `unit`'s part into its flat buffer `full`."""
        self._wait()
        assert self.buffer is not None
        rows = self.buffer.view(-1, self.rows_numel)
        off = self.offsets[id(unit)]
        if self.from_secondary:  # rank r's secondary is the r-th 1/P of the flat buffer
            full.view(rows.shape[0], -1).copy_(rows[:, off : off + full.numel() // rows.shape[0]])
        else:
            _copy_rows(rows, off, unit, full, into_rows=False)
        self.done(unit)

    def done(self, unit: ShardedUnit) -> None:
        """`unit` no longer needs the buffer (filled, or dropped before its wait)."""
        self.left.discard(id(unit))
        if not self.left and self.buffer is not None:
            self.buffer = None  # a pending collective keeps its own reference
            if self.tracker is not None:
                self.tracker.sub(self.nbytes)

    def _wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None


def _cut(units: Sequence[ShardedUnit], limit: int) -> list[list[ShardedUnit]]:
    """Consecutive batches of at most `limit` elements (a larger unit alone)."""
    batches: list[list[ShardedUnit]] = []
    numel = 0
    for u in units:
        if batches and numel + u.numel <= limit:
            batches[-1].append(u)
            numel += u.numel
        else:
            batches.append([u])
            numel = u.numel
    return batches


def gather_coalesced(units: Sequence[ShardedUnit], comm: Collectives, tracker: GatherTracker,
                     limit: int, zpp: ZeroPP = OFF) -> None:  # fmt: skip
    """Start gathering the released `units`: one collective per run of one dtype (and one
    source: the world, through one wire codec, or hpZ's secondary shards) and at most
    `limit` elements (the prefetch bucket: what the shared buffer may add)."""
    todo = [u for u in units if u.state is RELEASED and not u.persistent]

    def source(u: ShardedUnit) -> tuple[bool, int]:
        return u.secondary is not None, id(zpp.codec_for(u.trainable))

    runs: list[list[ShardedUnit]] = []
    for u in todo:  # consecutive units with one source
        if runs and source(runs[-1][0]) == source(u):
            runs[-1].append(u)
        else:
            runs.append([u])
    for same_source in runs:
        for run in (b for kind in _same_kind(same_source) for b in _cut(kind, limit)):
            if len(run) == 1:
                run[0].gather()
                continue
            if run[0].secondary is not None:
                assert zpp.hpz is not None
                shared = SharedGather(run, zpp.hpz, tracker, from_secondary=True)
            else:
                shared = SharedGather(run, comm, tracker, codec=zpp.codec_for(run[0].trainable))
            for u in run:
                u.gather_shared(shared)


def refresh_persistent(units: Sequence[ShardedUnit], comm: Collectives, bucket_numel: int
                       ) -> None:  # fmt: skip
    """After the update: all-gather the persistent units' full parameters, coalesced in
    collectives of at most `bucket_numel` elements."""
    runs = [b for kind in _same_kind(units) for b in _cut(kind, bucket_numel)]
    gathers = [(SharedGather(run, comm, None), run) for run in runs]
    for shared, run in gathers:  # all launched first, then waited for
        for u in run:
            assert u.full is not None
            shared.fill(u, u.full)


class GradBatcher:
    """Units with complete gradients, reduced together up to `limit_numel` elements."""

    def __init__(self, comm: Collectives, queue: InFlight, limit_numel: int,
                 zpp: ZeroPP = OFF) -> None:  # fmt: skip
        self.comm, self.queue = comm, queue
        self.zpp = zpp
        self.limit = max(int(limit_numel), 1)
        self.pending: list[ShardedUnit] = []
        self.numel = 0
        self.landed: Callable[[Tensor], object] | None = None

    def on_landed(self, callback: Callable[[Tensor], object]) -> None:
        """`callback(range)` runs when reduced gradients landed in a range of a unit's
        gradient shard (after any add into it), in completion order."""
        self.landed = callback

    def add(self, unit: ShardedUnit) -> None:
        """`unit`'s gradient buffer is complete: reduce it with the next ones."""
        if self.pending and (self.numel + unit.numel > self.limit
                             or self.pending[0].grad_dtype != unit.grad_dtype
                             or self.pending[0].device != unit.device):  # fmt: skip
            self.flush()
        self.pending.append(unit)
        self.numel += unit.numel
        if self.numel >= self.limit:
            self.flush()

    def flush(self) -> None:
        """Launch the reduction of the batch."""
        units, self.pending, self.numel = self.pending, [], 0
        units = [u for u in units if u.grad_full is not None]
        if len(units) == 1:
            u = units[0]
            for (work, full, temp), piece in zip(u.reduce_grads(), u.grad_shard_pieces()):
                done = None
                if temp is not None or self.landed is not None:
                    done = functools.partial(_land_piece, piece, temp, self.landed)
                self.queue.add(work, held=(full,), on_done=done)
            return
        if not units:
            return
        n, rank = self.comm.world_size, self.comm.rank
        size = sum(u.shard_numel for u in units)
        taken = [u.take_grads() for u in units]
        buffer = torch.empty(n * size, dtype=taken[0][0].dtype, device=taken[0][0].device)
        rows = buffer.view(n, size)
        offsets, off = [], 0
        for u, (grad, _) in zip(units, taken):
            _copy_rows(rows, off, u, grad, into_rows=True)
            offsets.append(off)
            off += u.shard_numel
        firsts = [first for _, first in taken]
        del taken, grad  # the units' full gradient buffers are freed before the collective runs
        out = rows[rank]
        work = (self.zpp.grads or self.comm).reduce_scatter(out, buffer, op="avg",
                                                            async_op=True)  # fmt: skip
        done = functools.partial(_land, units, offsets, firsts, out, self.landed)
        self.queue.add(work, held=(buffer,), on_done=done)


def _land(units: list[ShardedUnit], offsets: list[int], firsts: list[bool], out: Tensor,
          landed: Callable[[Tensor], object] | None = None) -> None:  # fmt: skip
    for u, off, first in zip(units, offsets, firsts):
        u.land_grads(out[off : off + u.shard_numel], first)
        if landed is not None:
            landed(u.grad_shard)


def _land_piece(piece: Tensor, temp: tuple[Tensor, Tensor] | None,
                landed: Callable[[Tensor], object] | None) -> None:  # fmt: skip
    """One bucket of a single unit's reduction landed in `piece` (or in a temporary to add)."""
    if temp is not None:
        temp[1].add_(temp[0])
    if landed is not None:
        landed(piece)

"""Which slice of which parameter each rank holds: one planner and one public description.

Every stage lays parameters out the same way. `plan_buckets` packs a parameter list into one
padded flat range cut into buckets (a bucket never cuts a parameter; each is padded to a
multiple of `num_shards * ALIGN` and split into `num_shards` equal chunks; rank r owns chunk r
of every bucket). Stage 0-2's `FlatParams` and stage 3's `ShardedUnit` both build on it.

The public, typed description (`ShardLayout`, returned by `optimizer.layout()`) says, per
parameter, which (rank, start, numel) pieces hold it and where each piece sits in that rank's
shard; `ShardState` (from `optimizer.shard_state(i)`) gives the live tensors. Checkpoints,
accounting and tests read these, never the optimizer's private fields. Importable with or
without torch.distributed initialised.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

# Chunks start on 16-element boundaries (64 bytes in fp32): the update kernels then issue
# full-width vector loads, and the pieces stay aligned when views of one allocation.
ALIGN = 16


# -- the planner ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bucket:
    """A contiguous, padded range of the flat buffer; the unit of one collective."""

    index: int
    start: int  # first element in the flat buffer
    numel: int  # padded size, a multiple of num_shards * ALIGN
    chunk: int  # numel // num_shards: what each rank owns
    shard_offset: int  # where a rank's chunk starts in its contiguous shard (same on all ranks)
    slots: tuple[int, ...]  # indices of the parameters inside

    def chunk_range(self, shard: int) -> tuple[int, int]:
        """[begin, end) of shard `shard`'s chunk, in flat-buffer elements."""
        begin = self.start + shard * self.chunk
        return begin, begin + self.chunk


@dataclass(frozen=True)
class SlotPlan:
    """Where one parameter lives in the flat range."""

    index: int
    offset: int
    numel: int
    bucket: int


@dataclass(frozen=True)
class BucketPlan:
    """A parameter list laid out: slots, buckets, total padded and per-shard sizes."""

    num_shards: int
    slots: tuple[SlotPlan, ...]
    buckets: tuple[Bucket, ...]
    numel: int
    shard_numel: int

    @property
    def param_numel(self) -> int:
        return sum(s.numel for s in self.slots)

    def overlaps(self, lo: int, hi: int, shard: int) -> list[tuple[int, int, int]]:
        """(bucket, begin, end), in chunk coordinates, of shard `shard`'s chunks inside
        flat [lo, hi)."""
        out = []
        for b in self.buckets:
            c0, c1 = b.chunk_range(shard)
            a, z = max(lo, c0), min(hi, c1)
            if a < z:
                out.append((b.index, a - c0, z - c0))
        return out

    def pieces(self, slot: SlotPlan) -> list[Piece]:
        """Every shard's pieces of one parameter; `shard_offset` indexes the shard that is
        the concatenation of that rank's chunks of every bucket (padding included)."""
        out = []
        for r in range(self.num_shards):
            for bi, a, z in self.overlaps(slot.offset, slot.offset + slot.numel, r):
                b = self.buckets[bi]
                start = b.chunk_range(r)[0] + a - slot.offset
                out.append(Piece(r, start, z - a, b.shard_offset + a))
        return sorted(out, key=lambda p: p.start)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def plan_buckets(
    numels: list[int], num_shards: int, bucket_numel: int,
    align: Callable[[int], int] | None = None,
) -> BucketPlan:  # fmt: skip
    """Lay `numels` out one after another; close a bucket when the next one would not fit.

    `align(numel)` (a state codec's need, powers of two): the flat offset each parameter must
    start at a multiple of; buckets are then padded so every chunk is a multiple of the
    largest alignment too, and a chunk boundary falls on a multiple of it inside every
    parameter. None: parameters packed back to back (the default layout).
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    aligns = [max(int(align(n)), 1) if align is not None else 1 for n in numels]
    unit = num_shards * max([ALIGN, *aligns])
    groups: list[list[int]] = [[]]
    filled = 0
    for i, n in enumerate(numels):
        end = _round_up(filled, aligns[i]) + n
        if groups[-1] and end > bucket_numel:
            groups.append([])
            end = n
        groups[-1].append(i)
        filled = end
    slots: list[SlotPlan] = []
    buckets: list[Bucket] = []
    start = shard_offset = 0
    for b, members in enumerate(groups):
        offset = start
        for i in members:
            offset = _round_up(offset, aligns[i])
            slots.append(SlotPlan(i, offset, numels[i], b))
            offset += numels[i]
        numel = max(_round_up(offset - start, unit), unit)
        chunk = numel // num_shards
        buckets.append(Bucket(b, start, numel, chunk, shard_offset, tuple(members)))
        start += numel
        shard_offset += chunk
    return BucketPlan(num_shards, tuple(slots), tuple(buckets), start, shard_offset)


# -- the public description ---------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """A contiguous run of one parameter's elements held by one rank."""

    rank: int  # rank in the optimizer's process group
    start: int  # first element, in the parameter's flattened (row-major) order
    numel: int
    shard_offset: int  # where it sits in that rank's shard of the parameter's shard group


@dataclass(frozen=True)
class ParamLayout:
    index: int  # position in the optimizer's trainable-parameter order
    name: str | None  # fully-qualified name (model.named_parameters()) when known
    shape: tuple[int, ...]
    dtype: torch.dtype  # the model parameter's dtype
    group: int  # optimizer param-group index
    shard_group: int  # index into ShardLayout.groups
    flat_offset: int  # first element in its flat buffer (stage 3: in its unit)
    pieces: tuple[Piece, ...]  # every rank's pieces, ordered by start, covering [0, numel)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ShardGroupLayout:
    """One (param group, dtype) flat buffer: one optimizer update unit."""

    index: int
    group: int
    dtype: torch.dtype
    shard_numel: int  # length of this rank's shard (the concatenation of ShardState.master)
    num_shards: int  # 1 at stage 0, else the group's world size


@dataclass(frozen=True)
class ShardLayout:
    stage: int
    world_size: int
    rank: int
    groups: tuple[ShardGroupLayout, ...]
    params: tuple[ParamLayout, ...]

    def local_pieces(self) -> list[tuple[ParamLayout, Piece]]:
        """What this rank holds and updates: (param, piece) in shard order. At stage 0 every
        rank holds everything (each param's full piece)."""
        me = 0 if self.stage == 0 else self.rank
        out = [(p, q) for p in self.params for q in p.pieces if q.rank == me]
        return sorted(out, key=lambda pq: (pq[0].shard_group, pq[1].shard_offset))


@dataclass
class ShardState:
    """Live tensors of one shard group on this rank (write into them in place to load)."""

    master: list[torch.Tensor]  # fp32 pieces; their concatenation IS the shard
    # optimizer state per name, aligned with `master` (a codec that stores another form
    # decodes it on first access; write, then `sync_params_from_master()` stores it)
    state: Mapping[str, list[torch.Tensor]]
    step: int  # update count of this group (write back with `optimizer.set_step`)
    # a generic torch.optim optimizer run on the shard, when one is (its own state_dict)
    generic: torch.optim.Optimizer | None = field(default=None, repr=False)
    # when the codec stores another form (8-bit blocks): the stored tensors of one parameter
    # piece, `pieces(shard_offset, numel) -> {name: (1-D view, parameter elements per
    # entry)}`, and every name it can return; None: `state` is what is stored
    pieces: Callable[[int, int], dict[str, tuple[torch.Tensor, int]]] | None = field(
        default=None, repr=False)
    stored_names: tuple[str, ...] = ()

    def state_names(self) -> list[str]:
        """Names of what a checkpoint saves for this group (never decodes)."""
        return sorted(self.stored_names if self.pieces is not None else self.state)

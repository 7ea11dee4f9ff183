"""Stage 3 as a builder of shard groups: the units' shards are the groups' shards.

At stage 3 a rank's parameter shard lives in the units (unit.py), so a shard group's pieces
are the ranges of those shards that belong to its (param group, dtype):

- fp32: the master pieces ARE views of the unit shards (no copy): the update writes the
  parameters' shards directly, and the next forward gathers them;
- bf16/fp16: the group keeps an fp32 master, and the update writes the unit shards rounded
  to the low precision.

No all-gather follows the update (the next forward gathers lazily), except for persistent
units, which keep full parameters and are refreshed after the update. Gradients come from
each unit's reduce-scatter into its gradient shard (engine.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from zeroshard import guards
from zeroshard.shard.codec import StateCodec
from zeroshard.shard.group import HeldParam, ShardGroup
from zeroshard.shard.layout import Piece
from zeroshard.shard.placement import GradLanding, Placement
from zeroshard.stage3.coalesce import refresh_persistent
from zeroshard.stage3.engine import Stage3Engine
from zeroshard.stage3.unit import ShardedUnit

Span = tuple[ShardedUnit, int, int]  # a unit and a flat range [lo, hi) of its parameters


class _UnitGrads:
    """Stage 3's `GradPath`: the engine reduces each unit's gradients into its gradient
    shard; the shard groups read their pieces of those shards."""

    sharded = True

    def __init__(self, engine: Stage3Engine) -> None:
        self.engine = engine
        self.listener: GradLanding | None = None

    def watch(self, listener: GradLanding) -> None:
        """Each coalesced reduction's landed gradient shard goes to `listener` (offload)."""
        self.listener = listener
        self.engine.batcher.on_landed(listener.grads_landed)

    def finish(self) -> None:
        self.engine.finish_reduction()

    def end_step(self) -> None:
        pass

    def zero_grad(self) -> None:
        if self.listener is not None:  # its copies still reading the shards finish first
            self.listener.grads_reset()
        self.engine.zero_grad()

    def held_tensors(self) -> dict[str, list[Tensor]]:
        return self.engine.held_tensors()


class UnitSharding:
    """Builds and serves the shard groups of stage 3 over one engine's units."""

    stage = 3

    def __init__(self, engine: Stage3Engine) -> None:
        self.engine = engine
        self.comm = engine.comm
        self.model = engine.model
        self.grads = _UnitGrads(engine)
        self._groups: list[tuple[ShardGroup, list[ShardedUnit]]] = []
        for u in engine.units:
            u.add_listener(self._refresh_master)

    def build_groups(
        self, group_index: int, params: list[Tensor], codec: StateCodec, placement: Placement
    ) -> list[ShardGroup]:
        engine = self.engine
        for p in params:
            if id(p) not in engine.param_units:
                raise ValueError(
                    f"rank {self.comm.rank}: param group {group_index} has a parameter of "
                    f"shape {tuple(p.shape)} that is not in the stage-3 model (pass the model's "
                    "own parameters)"
                )
        if isinstance(placement, GradLanding):  # host offload: copy shards in as they land
            self.grads.watch(placement)
        members = {id(p) for p in params}
        by_dtype: dict[torch.dtype, list[Span]] = {}
        for u in engine.units:
            if u.trainable:
                for lo, hi in _runs(u, members):
                    by_dtype.setdefault(u.dtype, []).append((u, lo, hi))
        out = []
        for dtype, spans in by_dtype.items():
            pieces = [(u, bi, a, z) for u, lo, hi in spans for bi, a, z in u.chunk_overlaps(lo, hi)]
            if not pieces:  # this rank holds nothing of the group (tiny params, many ranks)
                continue
            shard = [u.shard_pieces[bi][a:z] for u, bi, a, z in pieces]
            grads = [u.grad_shard_pieces()[bi][a:z] for u, bi, a, z in pieces]
            group = ShardGroup(
                group=group_index, dtype=dtype, shard=shard, grads=lambda g=grads: g,
                describe=lambda s=spans: self._describe(s),
                shard_numel=sum(t.numel() for t in shard), num_shards=self.comm.world_size,
                codec=codec, placement=placement, shard_index=self.comm.rank,
            )  # fmt: skip
            self._groups.append((group, [u for u, _, _, _ in pieces]))
            out.append(group)
        return out

    @torch.no_grad()
    def _refresh_master(self, unit: ShardedUnit) -> None:
        """User code rewrote `unit`'s shard (GatheredParameters): the fp32 master follows."""
        for group, units in self._groups:
            group.refresh_master([i for i, u in enumerate(units) if u is unit])

    def gather_params(self) -> None:
        """Nothing to gather: the next forward does. Persistent units are refreshed here,
        coalesced: one all-gather per `reduce_bucket_size` elements, not one per module."""
        self.engine.params_changed()
        persistent = [u for u in self.engine.units if u.persistent and u.trainable]
        refresh_persistent(persistent, self.comm, self.engine.reduce_numel or sum(
            u.numel for u in persistent))

    def finish_param_gather(self) -> None:
        """Nothing is left in flight after `gather_params` (its refresh waits)."""

    def held_tensors(self) -> dict[str, list[Tensor]]:
        """Parameter shards (plus persistent and currently gathered full parameters), gradient
        shards and in-flight gradient buffers, from the engine that holds them; `host`: the
        parameter shards that live in host memory (`offload_param`)."""
        held = self.engine.held_tensors()
        out = {k: held[k] for k in ("params", "grads", "comm_buffers")}
        out["host"] = [u.shard for u in self.engine.units if u.shard_on_host]
        out["hpz_secondary"] = self.engine.secondary_tensors()
        return out

    @torch.no_grad()
    def relink_moved(self) -> None:
        """A gathered (persistent) parameter whose storage was replaced after construction
        (`model.to()` copies, `p.data = ...`) no longer views its unit's full buffer: its
        values go into the buffer and it views the buffer again. Released parameters are
        placeholders that the next gather re-points, so they need nothing."""
        for u in self.engine.units:
            if u.full is None:
                continue
            changed = False
            for s in u.slots:
                p = s.param
                if p is None:
                    continue
                view = u.full[s.offset : s.offset + s.numel]
                if p.data.data_ptr() == view.data_ptr() or p.numel() != s.numel:
                    continue
                changed |= guards.relink(p, view, s.shape)
            if changed and u.persistent:  # the shard pieces are views of `full`
                u.notify_rewritten()

    def _describe(self, spans: list[Span]) -> list[HeldParam]:
        """A rank's shard of a group is the concatenation, over the group's flat runs in its
        units, of that rank's chunks inside each run (no padding)."""
        pieces: dict[int, list[Piece]] = {}
        slots: dict[int, Any] = {}
        for r in range(self.comm.world_size):
            off = 0
            for u, lo, hi in spans:
                for bi, a, z in u.plan.overlaps(lo, hi, r):
                    c0 = u.buckets[bi].chunk_range(r)[0]
                    for s in u.slots:
                        b0, b1 = max(s.offset, c0 + a), min(s.offset + s.numel, c0 + z)
                        if b0 < b1:
                            piece = Piece(r, b0 - s.offset, b1 - b0, off + b0 - c0 - a)
                            pieces.setdefault(id(s.param), []).append(piece)
                            slots[id(s.param)] = s
                    off += z - a
        return [
            HeldParam(slots[k].param, tuple(slots[k].shape), slots[k].offset,
                      tuple(sorted(ps, key=lambda q: q.start)))
            for k, ps in pieces.items()
        ]


def _runs(u: ShardedUnit, members: set[int]) -> list[tuple[int, int]]:
    """Flat ranges [lo, hi) of `u` made of consecutive parameters that are in `members`."""
    runs: list[tuple[int, int]] = []
    for s in u.slots:
        if id(s.param) not in members or not s.param.requires_grad:
            continue
        if runs and runs[-1][1] == s.offset:
            runs[-1] = (runs[-1][0], s.offset + s.numel)
        else:
            runs.append((s.offset, s.offset + s.numel))
    return runs

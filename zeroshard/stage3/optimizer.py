"""`Stage3Optimizer`: `ZeroOptimizer`'s step on parameter shards that the engine owns.

The step logic (global grad stats, clipping, inf/nan skip, loss scaling, one `apply_update`
per (param group, dtype), checkpoints) is inherited unchanged; what differs is where the
pieces come from. At stage 3 a rank's parameter shard lives in the units (unit.py), so an
entry's pieces are the ranges of those shards that belong to its param group:

- fp32: the master pieces ARE views of the unit shards (no copy): the update writes the
  parameters' shards directly, and the next forward gathers them;
- bf16/fp16: an fp32 master shard per entry, and `model_copies` are the views of the unit
  shards that the update writes rounded to the low precision.

No all-gather follows the update (the next forward gathers lazily), except for persistent
units, which keep full parameters and are refreshed after the update.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import guards, update
from ..optimizer import ZeroOptimizer, _Entry
from ..precision import LossScaler
from .schedule import Stage3Engine
from .unit import ShardedUnit


@dataclass
class _PieceBucket:
    numel: int


@dataclass
class _EntryLayout:
    """What checkpoint.py reads of an entry's layout (FlatParams' fields, for stage 3)."""

    dtype: torch.dtype
    param_numel: int
    shard_numel: int
    buckets: list[_PieceBucket]
    flat: Tensor = field(default_factory=lambda: torch.empty(0))


class _Stage3Grads:
    """The reducer interface `ZeroOptimizer.step` talks to, over the engine's grad shards."""

    def __init__(self, engine: Stage3Engine) -> None:
        self.engine = engine
        self.pieces: list[list[Tensor]] = []

    def finish(self) -> None:
        self.engine.finish_reduction()

    def grad_pieces(self, i: int) -> list[Tensor]:
        return self.pieces[i]

    def end_step(self) -> None:
        pass

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def held_tensors(self) -> dict[str, list[Tensor]]:
        return self.engine.held_tensors()


class Stage3Optimizer(ZeroOptimizer):
    """Built by `zeroshard.stage3.initialize_stage3`; same API as `ZeroOptimizer`."""

    _STAGES = (3,)

    def __init__(self, engine: Stage3Engine, params: Any, optimizer: str = "adamw",
                 **kwargs: Any) -> None:  # fmt: skip
        self._engine = engine
        self._piece_units: list[list[ShardedUnit]] = []
        super().__init__(params, optimizer, stage=3, **kwargs)
        self.comm = engine.comm  # one counter for the engine's and the optimizer's collectives
        for u in engine.units:
            u.listeners.append(self._refresh_master)

    # -- building -------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        torch.optim.Optimizer.add_param_group(self, param_group)
        gi = len(self.param_groups) - 1
        engine = self._engine
        if self._reducer is None:
            self._reducer = _Stage3Grads(engine)
        members = {id(p) for p in self.param_groups[-1]["params"] if p.requires_grad}
        guards.claim(self, [p for p in self.param_groups[-1]["params"] if p.requires_grad])  # #8
        for p in self.param_groups[-1]["params"]:
            if p.requires_grad and id(p) not in engine.param_units:
                raise ValueError(
                    f"rank {engine.comm.rank}: param group {gi} has a parameter of shape "
                    f"{tuple(p.shape)} that is not in the stage-3 model (pass the model's "
                    "own parameters)"
                )
        by_dtype: dict[torch.dtype, list[tuple[ShardedUnit, int, int, int]]] = {}
        for u in engine.units:
            if not u.trainable:
                continue
            for lo, hi in _runs(u, members):
                for bi, a, z in u.chunk_overlaps(lo, hi):
                    by_dtype.setdefault(u.dtype, []).append((u, bi, a, z))
        for dtype, pieces in by_dtype.items():
            self._add_stage3_entry(gi, dtype, pieces)

    def _add_stage3_entry(
        self, gi: int, dtype: torch.dtype, pieces: list[tuple[ShardedUnit, int, int, int]]
    ) -> None:
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"zeroshard trains fp32, bf16 or fp16 parameters, not {dtype}")
        if dtype == torch.float16 and self.loss_scaler is None:
            self.loss_scaler = LossScaler()
        shards = [u.shard_pieces[bi][a:z] for u, bi, a, z in pieces]
        grads = [u.grad_shard_pieces()[bi][a:z] for u, bi, a, z in pieces]
        numel = sum(t.numel() for t in shards)
        if dtype == torch.float32:
            master, master_shard, copies = shards, None, None
        else:
            master_shard = torch.empty(numel, dtype=torch.float32, device=shards[0].device)
            master, off = [], 0
            for s in shards:
                master.append(master_shard[off : off + s.numel()])
                master[-1].copy_(s)
                off += s.numel()
            copies = shards
        layout = _EntryLayout(dtype, numel, numel, [_PieceBucket(t.numel()) for t in shards])
        entry = _Entry(gi, layout, master, master_shard, copies)  # type: ignore[arg-type]
        hp = self._hyperparams(self.param_groups[gi])
        if self._generic_cls is None:
            entry.state = update.init_state(self.rule, hp, master)
        else:
            entry.generic = self._make_generic(entry)
        self._entries.append(entry)
        self._reducer.pieces.append(grads)
        self._piece_units.append([u for u, _, _, _ in pieces])

    @torch.no_grad()
    def _refresh_master(self, unit: ShardedUnit) -> None:
        """User code rewrote `unit`'s shard (GatheredParameters): the fp32 master follows."""
        for entry, units in zip(self._entries, self._piece_units):
            if entry.master_shard is None:
                continue
            for m, c, u in zip(entry.master, entry.model_copies, units):
                if u is unit:
                    m.copy_(c)

    # -- the step ---------------------------------------------------------------------------
    def _gather_params(self) -> None:
        """Nothing to gather: the next forward does. Persistent units are refreshed here."""
        works = []
        for u in self._engine.units:
            if u.persistent and u.trainable:
                for b, piece in zip(u.buckets, u.shard_pieces):
                    full = u.full[b.start : b.start + b.numel]
                    works.append(self.comm.all_gather(full, piece, async_op=True))
        for w in works:
            w.wait()

    def _held_tensors(self) -> dict[str, list[Tensor]]:
        """Parameter shards (plus persistent and currently gathered full parameters), gradient
        shards and in-flight gradient buffers, from the engine that holds them."""
        held = self._engine.held_tensors()
        return {k: held[k] for k in ("params", "grads", "comm_buffers")}

    @property
    def engine(self) -> Stage3Engine:
        return self._engine


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

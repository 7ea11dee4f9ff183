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

from typing import Any

import torch
from torch import Tensor

from .. import guards
from ..layout import ParamLayout, Piece
from ..optimizer import ZeroOptimizer, check_dtype
from . import relink  # noqa: F401  (issue 8: registers stage 3's moved-parameter re-link)
from .engine import Stage3Engine
from .unit import ShardedUnit


class _Stage3Grads:
    """Stage 3's `GradPath` (sharded parameters): the engine reduces each unit's gradients
    into its gradient shard; `ZeroOptimizer.step` reads the group's pieces of them."""

    sharded = True

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
        # per entry: the (unit, lo, hi) flat runs of its parameters, in shard order
        self._spans: list[list[tuple[ShardedUnit, int, int]]] = []
        super().__init__(params, optimizer, stage=3, **kwargs)
        self.comm = engine.comm  # one counter for the engine's and the optimizer's collectives
        for u in engine.units:
            u.add_listener(self._refresh_master)

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
        by_dtype: dict[torch.dtype, list[tuple[ShardedUnit, int, int]]] = {}
        for u in engine.units:
            if u.trainable:
                for lo, hi in _runs(u, members):
                    by_dtype.setdefault(u.dtype, []).append((u, lo, hi))
        for dtype, spans in by_dtype.items():
            self._add_stage3_entry(gi, dtype, spans)

    def _add_stage3_entry(
        self, gi: int, dtype: torch.dtype, spans: list[tuple[ShardedUnit, int, int]]
    ) -> None:
        pieces = [(u, bi, a, z) for u, lo, hi in spans for bi, a, z in u.chunk_overlaps(lo, hi)]
        if not pieces:  # this rank holds nothing of the group (tiny params, many ranks)
            return
        check_dtype(dtype)
        shards = [u.shard_pieces[bi][a:z] for u, bi, a, z in pieces]
        grads = [u.grad_shard_pieces()[bi][a:z] for u, bi, a, z in pieces]
        self._append_entry(gi, dtype, shards)
        self._reducer.pieces.append(grads)
        self._piece_units.append([u for u, _, _, _ in pieces])
        self._spans.append(spans)

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

    # -- the public layout ---------------------------------------------------------------------
    def _model_names(self, model: torch.nn.Module | None) -> dict[int, str]:
        return super()._model_names(model if model is not None else self._engine.model)

    def _shard_group_numel(self, i: int) -> tuple[int, int]:
        return sum(m.numel() for m in self._entries[i].master), self.comm.world_size

    def _param_layouts(self, names: dict[int, str]) -> list[ParamLayout]:
        """Stage 3: a rank's shard of a group is the concatenation, over the group's flat runs
        in its units, of that rank's chunks inside each run (no padding)."""
        index = self._param_index()
        pieces: dict[int, list[Piece]] = {}
        where: dict[int, tuple[int, int]] = {}  # id(param) -> (shard group, offset in unit)
        for si, spans in enumerate(self._spans):
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
                                where[id(s.param)] = (si, s.offset)
                        off += z - a
        out = []
        for u in self._engine.units:
            for s in u.slots:
                if id(s.param) not in where:
                    continue
                pos, gi = index[id(s.param)]
                si, offset = where[id(s.param)]
                ps = tuple(sorted(pieces[id(s.param)], key=lambda q: q.start))
                out.append(ParamLayout(pos, names.get(id(s.param)), tuple(s.shape), u.dtype,
                                       gi, si, offset, ps))  # fmt: skip
        return out

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

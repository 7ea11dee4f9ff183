"""TEMPORARY adapter: the public shard-layout API (LAYOUT_API.md, issue 7) built from today's
optimizer internals, so the checkpoint code can be written and tested against that API now.

When `zeroshard/layout.py` and the optimizer methods land, this file is replaced by thin
calls to them (`opt.layout(model)`, `opt.shard_state(i)`, `opt.set_step(i, n)`,
`opt.sync_params_from_master()`). It is the ONLY checkpoint file that reads private
attributes. `model_pieces` (frozen parameters and optimizer-less model loads, not covered by
the layout API) also lives here for that reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Piece:
    """A contiguous run of one parameter's elements held by one rank."""

    rank: int
    start: int
    numel: int
    shard_offset: int


@dataclass(frozen=True)
class ParamLayout:
    index: int
    name: str | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    group: int
    shard_group: int
    flat_offset: int
    pieces: tuple[Piece, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ShardGroupLayout:
    index: int
    group: int
    dtype: torch.dtype
    shard_numel: int
    num_shards: int


@dataclass(frozen=True)
class ShardLayout:
    stage: int
    world_size: int
    rank: int
    groups: tuple[ShardGroupLayout, ...]
    params: tuple[ParamLayout, ...]

    def local_pieces(self) -> list[tuple[ParamLayout, Piece]]:
        mine = 0 if self.stage == 0 else self.rank
        out = [(p, pc) for p in self.params for pc in p.pieces if pc.rank == mine]
        out.sort(key=lambda t: (t[0].shard_group, t[1].shard_offset))
        return out


@dataclass
class ShardState:
    master: list[Tensor]
    state: dict[str, list[Tensor]]
    step: int


def _names(model: nn.Module | None) -> dict[int, str]:
    if model is None:
        return {}
    return {id(p): n for n, p in model.named_parameters()}


def layout(opt: Any, model: nn.Module | None = None) -> ShardLayout:
    """`opt.layout(model)`."""
    if opt.stage == 3:
        return _layout_stage3(opt, model or opt.engine.model)
    names = _names(model)
    world, rank = opt.comm.world_size, opt.comm.rank
    groups, params = [], []
    for gi, e in enumerate(opt._entries):
        f = e.flat
        groups.append(ShardGroupLayout(gi, e.group, f.dtype, f.shard_numel, f.num_shards))
        for s in f.slots:
            b = f.buckets[s.bucket]
            pieces = []
            for r in range(f.num_shards):
                c0, c1 = b.chunk_range(r)
                a, z = max(c0, s.offset), min(c1, s.offset + s.numel)
                if a < z:
                    pieces.append(Piece(r, a - s.offset, z - a, b.shard_offset + a - c0))
            params.append(
                ParamLayout(len(params), names.get(id(s.param)), tuple(s.param.shape), f.dtype,
                            e.group, gi, s.offset, tuple(pieces))
            )  # fmt: skip
    return ShardLayout(opt.stage, world, rank, tuple(groups), tuple(params))


def _layout_stage3(opt: Any, model: nn.Module) -> ShardLayout:
    from ..stage3.optimizer import _runs

    names = _names(model)
    engine = opt.engine
    world, rank = opt.comm.world_size, opt.comm.rank
    groups, params = [], []
    by_param: dict[int, list[Piece]] = {}
    info: dict[int, tuple] = {}
    for gi, e in enumerate(opt._entries):
        members = {id(p) for p in opt.param_groups[e.group]["params"] if p.requires_grad}
        units = [u for u in engine.units if u.trainable and u.dtype == e.flat.dtype]
        groups.append(ShardGroupLayout(gi, e.group, e.flat.dtype, e.flat.shard_numel, world))
        for r in range(world):
            cursor = 0
            for u in units:
                for lo, hi in _runs(u, members):
                    for b in u.buckets:
                        c0, c1 = b.chunk_range(r)
                        a, z = max(lo, c0), min(hi, c1)
                        if a >= z:
                            continue
                        for s in u.slots:
                            sa, sz = max(a, s.offset), min(z, s.offset + s.numel)
                            if sa < sz and id(s.param) in members:
                                by_param.setdefault(id(s.param), []).append(
                                    Piece(r, sa - s.offset, sz - sa, cursor + sa - a)
                                )
                                info[id(s.param)] = (s, e.group, gi)
                        cursor += z - a
    order = sorted(info, key=lambda k: (info[k][2], min(pc.shard_offset for pc in by_param[k])))
    for k in order:
        s, group, gi = info[k]
        pieces = tuple(sorted(by_param[k], key=lambda pc: pc.start))
        params.append(ParamLayout(len(params), names.get(k), tuple(s.shape),
                                  s.param.dtype, group, gi, s.offset, pieces))  # fmt: skip
    return ShardLayout(3, world, rank, tuple(groups), tuple(params))


def shard_state(opt: Any, i: int) -> ShardState:
    """`opt.shard_state(i)`: live tensors (write into them in place to load)."""
    e = opt._entries[i]
    state = dict(e.state)
    if e.generic is not None:
        for m in e.master:
            for k, v in e.generic.state.get(m, {}).items():
                if torch.is_tensor(v) and v.numel() == m.numel() and v.dim() > 0:
                    state.setdefault(k, []).append(v)
    return ShardState(list(e.master), state, e.step)


def set_step(opt: Any, i: int, step: int) -> None:
    opt._entries[i].step = int(step)


@torch.no_grad()
def sync_params_from_master(opt: Any) -> None:
    for e in opt._entries:
        if e.model_copies is not None:
            for c, m in zip(e.model_copies, e.master):
                c.copy_(m)
    opt._gather_params()


# -- model pieces (not part of the layout API) -----------------------------------------------
@dataclass
class ModelPiece:
    """What this rank holds of one named parameter, as views it can read or write."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    trainable: bool
    writer: bool  # this rank saves these pieces (replicated params: rank 0 only)
    views: list[tuple[int, Tensor]]  # (start element, 1-D view)


def model_pieces(model: nn.Module, rank: int) -> list[ModelPiece]:
    """Every named parameter (tied ones once) and the elements this rank holds of it."""
    out = []
    for name, p in model.named_parameters():
        u = getattr(p, "_zs_unit", None)
        if u is None or u.persistent:
            full = p.data.reshape(-1) if u is None else _unit_full_view(u, p)
            shape = tuple(p.shape) if u is None else tuple(u.slots[u.index[id(p)]].shape)
            out.append(ModelPiece(name, shape, p.dtype, p.requires_grad, rank == 0,
                                  [(0, full)]))  # fmt: skip
            continue
        s = u.slots[u.index[id(p)]]
        views = []
        for bi, a, z in u.chunk_overlaps(s.offset, s.offset + s.numel):
            c0 = u.buckets[bi].chunk_range(u.rank)[0]
            views.append((c0 + a - s.offset, u.shard_pieces[bi][a:z]))
        out.append(ModelPiece(name, tuple(s.shape), u.dtype, p.requires_grad, True, views))
    return out


def _unit_full_view(u: Any, p: Tensor) -> Tensor:
    s = u.slots[u.index[id(p)]]
    return u.full[s.offset : s.offset + s.numel]


def after_model_write(model: nn.Module) -> None:
    """Stage 3: the optimizer's fp32 master follows shards rewritten in place."""
    engine = getattr(model, "_zs_engine", None)
    if engine is None:
        return
    for u in engine.units:
        for listener in u.listeners:
            listener(u)


def stage_of(model: nn.Module) -> int | None:
    return 3 if getattr(model, "_zs_engine", None) is not None else None

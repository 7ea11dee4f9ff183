"""The checkpoint code's one door into the optimizer and the stage-3 units.

Optimizer side: the public shard-layout API (zeroshard/shard/layout.py: `opt.layout(model)`,
`opt.shard_state(i)`, `opt.set_step(i, n)`, `opt.sync_params_from_master()`), re-exported
here as functions. Model side (not covered by the layout API): `model_pieces`, the elements
of every named parameter this rank holds (frozen parameters, optimizer-less loads), read
through `zeroshard.stage3.registry` for stage-3 models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from zeroshard.shard.layout import Piece, ShardLayout, ShardState  # noqa: F401 - re-exported for callers
from zeroshard.stage3 import registry


def layout(opt: Any, model: nn.Module | None = None) -> ShardLayout:
    return opt.layout(model)


def shard_state(opt: Any, i: int) -> ShardState:
    return opt.shard_state(i)


def set_step(opt: Any, i: int, step: int) -> None:
    opt.set_step(i, step)


def sync_params_from_master(opt: Any) -> None:
    opt.sync_params_from_master()


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
        u = registry.unit_of(p)
        if u is None:
            out.append(ModelPiece(name, tuple(p.shape), p.dtype, p.requires_grad, rank == 0,
                                  [(0, p.data.reshape(-1))]))  # fmt: skip
            continue
        s = u.slots[u.index[id(p)]]
        if u.persistent:
            full = u.full[s.offset : s.offset + s.numel]
            out.append(ModelPiece(name, tuple(s.shape), u.dtype, p.requires_grad, rank == 0,
                                  [(0, full)]))  # fmt: skip
            continue
        views = []
        for bi, a, z in u.chunk_overlaps(s.offset, s.offset + s.numel):
            c0 = u.buckets[bi].chunk_range(u.rank)[0]
            views.append((c0 + a - s.offset, u.shard_pieces[bi][a:z]))
        out.append(ModelPiece(name, tuple(s.shape), u.dtype, p.requires_grad, True, views))
    return out


def after_model_write(model: nn.Module) -> None:
    """Stage 3: the optimizer's fp32 master follows shards rewritten in place."""
    engine = registry.engine_of(model)
    if engine is None:
        return
    for u in engine.units:
        u.notify_rewritten()


def stage_of(model: nn.Module) -> int | None:
    return 3 if registry.engine_of(model) is not None else None

"""The few collectives checkpoints need, on a gloo group of their own.

A dedicated CPU (gloo) group lets an async save's background thread vote and exchange file
lists while the training thread keeps using the main group (NCCL or gloo), and makes the vote
tensor a CPU tensor on every backend. Without torch.distributed every call is the 1-rank case.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import torch
import torch.distributed as dist

_GROUPS: dict[int, Any] = {}


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if initialized() else (0, 1)


def group() -> Any:
    """The checkpoint gloo group (created once, collectively, on first use)."""
    if not initialized():
        return None
    key = id(dist.distributed_c10d._get_default_group())
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group(backend="gloo")
    return _GROUPS[key]


def all_ok(ok: bool, pg: Any = None) -> bool:
    """True on every rank only if `ok` on every rank (one all_reduce of an error flag)."""
    if not initialized():
        return ok
    flag = torch.tensor([0.0 if ok else 1.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=pg or group())
    return flag.item() == 0.0


def all_gather_obj(obj: Any, pg: Any = None) -> list[Any]:
    """Every rank's `obj` (JSON-sized metadata only; travels over the wire, never disk)."""
    if not initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=pg or group())
    return out


def broadcast_obj(obj: Any, pg: Any = None) -> Any:
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=pg or group())
    return box[0]


def crash_point(name: str) -> None:
    """Test hook: ZEROSHARD_CKPT_CRASH="<point>:<rank|all>" SIGKILLs this process there."""
    spec = os.environ.get("ZEROSHARD_CKPT_CRASH")
    if not spec:
        return
    point, _, who = spec.partition(":")
    if point == name and who in ("all", str(rank_world()[0])):
        os.kill(os.getpid(), signal.SIGKILL)

"""The few collectives checkpoints need, on a gloo group of their own, and the arrival check.

The checkpoint group is a gloo process group built straight on the default group's store and
kept by this module, outside torch's registry of groups: `dist.destroy_process_group()` does
not tear it down, so an async save's background thread finishes its vote and publication even
when the training script destroys the default group right after `save_checkpoint`. It is a
CPU group on every backend, so votes and file lists never touch NCCL. Objects travel as JSON
(no pickle). Without torch.distributed every call is the 1-rank case.

`arrive(call)` runs first in every save and load: each rank checks in on the store and waits
(polling, at most `arrival_timeout()` seconds) for the others. A call made on only some ranks
(`if rank == 0: save_checkpoint(...)`) then ends with an error naming the call and the missing
ranks instead of blocking in a collective for the process group's 30 minutes.
"""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

ARRIVAL_ENV = "ZEROSHARD_CKPT_ARRIVAL_TIMEOUT_S"
DEFAULT_ARRIVAL_S = 300.0  # well under the process group's default 30 minutes
COLLECTIVE_ENV = "ZEROSHARD_CKPT_COLLECTIVE_TIMEOUT_S"
_POISON = 1 << 32  # added to an arrival counter by a rank that gave up waiting

# per default process group: (that group, kept so its id is not reused; our state)
_STATE: dict[int, tuple[Any, dict[str, Any]]] = {}


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded; the message names the file and fault."""


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if initialized() else (0, 1)


def arrival_timeout() -> float:
    """Seconds a rank waits in `arrive` for the others ($ZEROSHARD_CKPT_ARRIVAL_TIMEOUT_S)."""
    return float(os.environ.get(ARRIVAL_ENV, DEFAULT_ARRIVAL_S))


def _state() -> dict[str, Any]:
    default = dist.distributed_c10d._get_default_group()
    key = id(default)
    if key not in _STATE:
        store = dist.distributed_c10d._get_default_store()
        _STATE[key] = (default, {"store": store, "seq": 0, "pg": None})
    return _STATE[key][1]


class Group:
    """A private gloo group: rank, size and the raw process group."""

    def __init__(self, store: Any, rank: int, world: int) -> None:
        timeout = timedelta(seconds=float(os.environ.get(COLLECTIVE_ENV, 1800)))
        self.rank, self.world = rank, world
        self.pg = dist.ProcessGroupGloo(dist.PrefixStore("zeroshard-ckpt-pg/", store),
                                        rank, world, timeout)  # fmt: skip


def group() -> Group | None:
    """The checkpoint group (created once, collectively: call after `arrive`)."""
    if not initialized():
        return None
    st = _state()
    if st["pg"] is None:
        rank, world = rank_world()
        st["pg"] = Group(st["store"], rank, world)
    return st["pg"]


def arrive(call: str) -> None:
    """Wait until every rank has entered a checkpoint call, at most `arrival_timeout()`.

    Raises CheckpointError on every rank that entered if some did not in time; a rank arriving
    after the others gave up raises at once. All ranks must also have entered the same call.
    """
    if not initialized():
        return
    st = _state()
    st["seq"] += 1
    rank, world = rank_world()
    store, base = st["store"], f"zeroshard-ckpt-arrive/{st['seq']}"
    store.set(f"{base}/{rank}", call)
    limit = arrival_timeout()
    deadline = time.monotonic() + limit
    value, pause = store.add(base, 1), 0.002
    if value >= _POISON:
        raise CheckpointError(
            f"{call}: rank {rank} entered checkpoint call #{st['seq']} after the other ranks "
            f"stopped waiting for it ({limit:g} s): every rank must call {call} together"
        )
    while value % _POISON != world:
        if value >= _POISON:
            raise CheckpointError(f"{call}: another rank gave up waiting for the missing ranks "
                               f"(deadline {limit:g} s); every rank must call {call}")  # fmt: skip
        if time.monotonic() > deadline:
            value = store.add(base, _POISON)
            if value % _POISON == world:
                break  # the last rank arrived just now: go on, as the others do
            missing = [r for r in range(world) if not store.check([f"{base}/{r}"])]
            raise CheckpointError(
                f"{call}: rank(s) {missing} did not enter {call} within {limit:g} s (the "
                f"deadline, ${ARRIVAL_ENV}); every rank must call it, not only some (e.g. "
                "not under `if rank == 0:`)"
            )
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
        value = store.add(base, 0)
    calls = [store.get(f"{base}/{r}").decode() for r in range(world)]
    if len(set(calls)) > 1:
        raise CheckpointError("ranks entered different checkpoint calls at once: "
                           + ", ".join(f"rank {r}: {c}" for r, c in enumerate(calls)))  # fmt: skip


def _resolve(pg: Group | None) -> Group | None:
    """`pg`, else the checkpoint group (None without torch.distributed). A background save
    passes its group: it works after the default group is destroyed."""
    return pg if pg is not None else group()


def all_ok(ok: bool, pg: Group | None = None) -> bool:
    """True on every rank only if `ok` on every rank (one all_reduce of an error flag)."""
    g = _resolve(pg)
    if g is None:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0])
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.MAX
    g.pg.allreduce([flag], opts).wait()
    return flag.item() == 0.0


def all_gather_obj(obj: Any, pg: Group | None = None) -> list[Any]:
    """Every rank's `obj` (JSON data, metadata-sized; travels as JSON bytes, never pickled)."""
    g = _resolve(pg)
    if g is None:
        return [obj]
    data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(g.world)]
    g.pg.allgather([sizes], [torch.tensor([data.numel()])]).wait()
    n = max(int(s.item()) for s in sizes)
    padded = torch.zeros(n, dtype=torch.uint8)
    padded[: data.numel()] = data
    outs = [torch.empty(n, dtype=torch.uint8) for _ in range(g.world)]
    g.pg.allgather([outs], [padded]).wait()
    return [json.loads(bytes(o[: int(s.item())].numpy())) for o, s in zip(outs, sizes)]


def faults(error: BaseException | None, pg: Group | None = None) -> str:
    """The vote: "" if no rank failed, else every failing rank's error, the same text on
    every rank ("rank 1: FileExistsError: ...")."""
    mine = "" if error is None else f"{type(error).__name__}: {error}"
    found = all_gather_obj(mine, pg)
    return "; ".join(f"rank {r}: {m}" for r, m in enumerate(found) if m)


def broadcast_obj(obj: Any, pg: Group | None = None) -> Any:
    """Rank 0's `obj` on every rank."""
    return all_gather_obj(obj, pg)[0]


def crash_point(name: str, rank: int | None = None) -> None:
    """Test hook: ZEROSHARD_CKPT_CRASH="<point>:<rank|all>" SIGKILLs this process there."""
    spec = os.environ.get("ZEROSHARD_CKPT_CRASH")
    if not spec:
        return
    point, _, who = spec.partition(":")
    if rank is None:  # a background save may run after the default group is destroyed
        rank = rank_world()[0] if initialized() else int(os.environ.get("RANK", 0))
    if point == name and who in ("all", str(rank)):
        os.kill(os.getpid(), signal.SIGKILL)

"""A pool of spawned gloo ranks that stays up for the whole test session.

Starting a process group costs seconds (process spawn + torch import + rendezvous); the test
suite starts one per world size and sends it many small jobs. A job is a module-level
function `fn(*args)` run on every rank at once; `run` returns the per-rank results in rank
order, or raises with the failing ranks' tracebacks. A failed job may leave ranks stuck in a
collective, so the pool is torn down and respawned on the next `run`.
"""

from __future__ import annotations

import importlib
import os
import socket
import traceback
from datetime import timedelta

import torch.multiprocessing as mp

# gloo gives up on a collective after this long, so a broken job ends instead of hanging.
COLLECTIVE_TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tasks, results) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world), LOCAL_RANK=str(rank), TRITON_INTERPRET="1",
    )  # fmt: skip
    import warnings

    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    )
    while True:
        job = tasks.get()
        if job is None:
            break
        module, name, args, kwargs = job
        try:
            fn = getattr(importlib.import_module(module), name)
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # report everything, the parent decides
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class DistPool:
    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._procs: list = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        port = _free_port()
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(r, self.world_size, port, self._tasks[r], self._results),
                daemon=True,
            )
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()

    def run(self, fn, *args, timeout: float = 300, **kwargs) -> list:
        if not self._procs or not all(p.is_alive() for p in self._procs):
            self.close()
            self._start()
        for q in self._tasks:
            q.put((fn.__module__, fn.__name__, args, kwargs))
        out: dict[int, object] = {}
        errors: dict[int, str] = {}
        try:
            for _ in range(self.world_size):
                rank, ok, value = self._results.get(timeout=timeout)
                (out if ok else errors)[rank] = value
        except Exception as e:  # queue.Empty: a rank died or hung
            self.close()
            raise RuntimeError(f"job {fn.__name__} timed out or a rank died: {e!r}") from e
        if errors:
            self.close()
            msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise RuntimeError(f"job {fn.__name__} failed on ranks {sorted(errors)}:\n{msg}")
        return [out[r] for r in range(self.world_size)]

    def close(self) -> None:
        for q in getattr(self, "_tasks", []):
            try:
                q.put(None)
            except Exception:
                pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        self._procs = []


def in_process(fn, *args, **kwargs) -> list:
    """World size 1: run the job in this process, without a process group."""
    return [fn(*args, **kwargs)]


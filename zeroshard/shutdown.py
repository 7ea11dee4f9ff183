"""A clean interpreter exit, with or without `destroy_process_group()`: gloo's worker
threads must go idle before CPython finalizes.

The cause, measured (gdb, torch 2.13, CPython 3.11): a gloo worker thread that finishes a
collective drops its reference to the work object. When Python dropped its own handle first
(any `work.wait()` followed by the end of the handle's scope does), the worker destroys the
work, and with it the tensors' references; a tensor that has a Python object then calls
`TensorImpl::decref_pyobject`, which takes the GIL (6,000 async collectives in a loop: 1,725
such GIL takes on worker threads). If the interpreter is already finalizing, CPython 3.11
ends that thread with `pthread_exit`; its forced unwind meets the `noexcept` of
`decref_pyobject`, and the process aborts with "terminate called without an active
exception" after all work is done. (CPython 3.14 parks the thread instead: a hang.) A worker
normally finishes this clean-up microseconds after the collective, so it only bites when a
worker is descheduled at the very end of a run: measured about 1 run in 10 on a loaded
2-core machine with no exit handler, 1 in 126 with a barrier only.

So the first zeroshard optimizer registers an `atexit` handler that, before finalization:
1. on a normal exit with the process group still up, meets the other ranks in a barrier (gloo:
   a monitored barrier with a timeout, so a dead peer delays the exit by at most that long);
2. waits until every gloo worker thread of this process sleeps (it releases the GIL while it
   waits, so a worker in its clean-up can take the GIL and finish it);
3. destroys the process group, as a well-behaved script would.
After an uncaught exception it skips the barrier (the peers may be stuck) but still waits for
the local workers: a worker blocked on a dead peer sleeps, so that wait stays short.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
from datetime import timedelta

import torch.distributed as dist

BARRIER_TIMEOUT_S = 30
QUIESCE_TIMEOUT_S = 5.0  # the longest the exit waits for busy gloo worker threads
_POLL_S = 0.005
_QUIET_POLLS = 3  # consecutive polls with every worker asleep
WORKER_NAMES = ("pt_gloo_runloop",)  # torch's name for ProcessGroupGloo's worker threads
_registered = False


def register() -> None:
    """Install the exit handler (once per process)."""
    global _registered
    if not _registered:
        _registered = True
        atexit.register(_at_exit)


def _at_exit() -> None:
    up = dist.is_available() and dist.is_initialized()
    clean = getattr(sys, "last_value", None) is None  # not exiting on an uncaught exception
    if up and clean:
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=timedelta(seconds=BARRIER_TIMEOUT_S))
            else:
                dist.barrier()
        except Exception:  # a peer is gone: still release our side
            pass
    wait_for_idle_workers()
    if up:
        dist.destroy_process_group()


def wait_for_idle_workers(
    timeout: float = QUIESCE_TIMEOUT_S, tasks: str = "/proc/self/task"
) -> bool:
    """Sleep (GIL released) until every gloo worker thread of this process has been asleep
    for `_QUIET_POLLS` polls in a row: idle, or blocked on a peer. True when they are (or
    there are none); False after `timeout`. Linux reads the thread states from /proc (`tasks`:
    that folder, a parameter for tests); elsewhere one short sleep gives a worker in its
    clean-up the GIL.

    A worker that waits for the GIL reads as asleep while this thread holds it to poll, so
    the polls are `_POLL_S` apart: long enough that such a worker, signalled when this
    thread sleeps, runs (state R while it is runnable) before the next poll."""
    if not os.path.isdir(tasks):
        time.sleep(0.05)
        return True
    workers = [t for t in os.listdir(tasks) if _thread_name(tasks, t) in WORKER_NAMES]
    deadline = time.monotonic() + timeout
    quiet = 0
    while workers and quiet < _QUIET_POLLS:
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL_S)
        asleep = all(_thread_state(tasks, t) in ("S", "X", "Z", None) for t in workers)
        quiet = quiet + 1 if asleep else 0
    return True


def _thread_name(tasks: str, tid: str) -> str | None:
    try:
        with open(f"{tasks}/{tid}/comm") as f:
            return f.read().strip()
    except OSError:  # the thread ended
        return None


def _thread_state(tasks: str, tid: str) -> str | None:
    """The one-letter scheduler state (R running, S sleeping, ...), None if it ended."""
    try:
        with open(f"{tasks}/{tid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None

"""The one background save in flight per process, and waiting for it.

The snapshot (CPU copies) is taken by the caller; the thread writes, fsyncs, votes and
publishes (on the checkpoint's private gloo group: the training thread's collectives are not
in its way, and `dist.destroy_process_group()` does not pull it from under the thread).
`wait()` joins it and re-raises its error; it runs before the next save or load and at
process exit, where a failure sets exit code 1.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

_pending: dict[str, Any] = {}


def start(fn: Callable[[], Any]) -> None:
    def body() -> None:
        try:
            _pending["result"] = fn()
        except BaseException as e:  # surfaces at the next wait()
            _pending["error"] = e

    _pending.clear()
    t = threading.Thread(target=body, name="zeroshard-async-save", daemon=False)
    _pending["thread"] = t
    t.start()


def wait() -> Any:
    """Block until the background save (if any) is done; raise its error if it failed."""
    t = _pending.get("thread")
    if t is None:
        return None
    t.join()
    error, result = _pending.get("error"), _pending.get("result")
    _pending.clear()
    if error is not None:
        raise error
    return result


def pending() -> bool:
    t = _pending.get("thread")
    return t is not None and t.is_alive()


def _at_exit() -> None:
    """The interpreter joined the writer thread already (it is not a daemon); a failure
    nobody waited for ends the process with exit code 1, so a launcher sees it."""
    try:
        wait()
    except BaseException as e:  # noqa: BLE001 - exiting: report through the exit code
        print(f"zeroshard: background checkpoint save failed: {e}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


atexit.register(_at_exit)

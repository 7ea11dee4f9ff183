"""The one background save in flight per process, and waiting for it.

The snapshot (CPU copies) is taken by the caller; the thread writes, fsyncs, votes and
publishes (on the checkpoint gloo group, so the training thread's collectives are not in its
way). `wait()` joins it and re-raises its error; it runs before the next save or load and at
process exit.
"""

from __future__ import annotations

import atexit
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
    try:
        wait()
    except BaseException as e:  # noqa: BLE001 - exiting: report, do not mask the exit
        print(f"zeroshard: background checkpoint save failed: {e!r}")


atexit.register(_at_exit)

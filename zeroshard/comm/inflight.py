"""A bounded FIFO of asynchronous collectives, shared by every gradient path.

Stages 0-2 (grad_reducer.py) and stage 3 (stage3/engine.py) both launch reductions while
backward runs and must not keep more than a few in flight: each holds a full-size gradient
buffer. Each entry carries what must happen when it completes (add a temporary into the
shard, recycle a buffer) and the tensors it keeps alive (for the memory report).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

# Reductions kept in flight before waiting on the oldest (double buffering, as DeepSpeed does
# with overlap_comm).
MAX_IN_FLIGHT = 2


@dataclass
class _Pending:
    work: object  # a dist.Work (or collectives.DONE)
    tag: object  # what `wait_for` matches (a bucket, a unit), or None
    held: tuple[Tensor, ...]  # tensors the collective reads or writes
    on_done: Callable[[], object] | None


class InFlight:
    """Launched collectives, oldest first; completes them in launch order."""

    def __init__(self) -> None:
        self._queue: deque[_Pending] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def add(
        self,
        work: object,
        *,
        tag: object = None,
        held: tuple[Tensor, ...] = (),
        on_done: Callable[[], object] | None = None,
    ) -> None:
        self._queue.append(_Pending(work, tag, tuple(t for t in held if t is not None), on_done))

    def complete_oldest(self) -> None:
        entry = self._queue.popleft()
        entry.work.wait()
        if entry.on_done is not None:
            entry.on_done()

    def wait_below(self, limit: int) -> None:
        """Complete the oldest until at most `limit` remain."""
        while len(self._queue) > limit:
            self.complete_oldest()

    def wait_for(self, tag: object) -> None:
        """Complete collectives (in order) until none tagged `tag` is left."""
        while any(e.tag is tag for e in self._queue):
            self.complete_oldest()

    def drain(self) -> None:
        self.wait_below(0)

    def held_tensors(self) -> list[Tensor]:
        return [t for e in self._queue for t in e.held]

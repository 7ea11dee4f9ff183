"""ZeRO++ training jobs (run on every rank), with 4 ranks seen as 2 nodes of 2."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from tests.stage3_jobs import train_stage3


@contextlib.contextmanager
def nodes_of(local_world_size: int) -> Iterator[None]:
    """torchrun's LOCAL_WORLD_SIZE for the duration of a job (the pool's ranks are reused)."""
    old = os.environ.get("LOCAL_WORLD_SIZE")
    os.environ["LOCAL_WORLD_SIZE"] = str(local_world_size)
    try:
        yield
    finally:
        if old is None:
            del os.environ["LOCAL_WORLD_SIZE"]
        else:
            os.environ["LOCAL_WORLD_SIZE"] = old


def train_nodes(local_world_size: int, jobs: list[tuple]) -> list[dict]:
    """Several stage-3 runs (train_stage3's arguments, zero keys last) on nodes of
    `local_world_size` ranks."""
    with nodes_of(local_world_size):
        return [train_stage3(*job[:-1], **job[-1]) for job in jobs]

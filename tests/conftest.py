"""Shared test setup.

TRITON_INTERPRET must be set before anything imports triton (the mode is fixed when a
@triton.jit decorator runs), so it is set here, at the top of the first file pytest imports.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.dist_pool import DistPool, in_process  # noqa: E402


@pytest.fixture(scope="session")
def dist_run():
    """`dist_run(world_size, fn, *args)` runs `fn` on that many gloo ranks (one shared pool
    per world size for the whole session; world size 1 runs in this process)."""
    pools: dict[int, DistPool] = {}

    def run(world_size: int, fn, *args, **kwargs):
        if world_size == 1:
            return in_process(fn, *args, **kwargs)
        if world_size not in pools:
            pools[world_size] = DistPool(world_size)
        return pools[world_size].run(fn, *args, **kwargs)

    yield run
    for pool in pools.values():
        pool.close()

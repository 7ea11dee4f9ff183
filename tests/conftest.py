"""Shared test setup.

TRITON_INTERPRET must be set before anything imports triton (the mode is fixed when a
@triton.jit decorator runs), so it is set here, at the top of the first file pytest imports.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")


def _import_pypi_kernels() -> None:
    """The checkout's kernels/ (installed as `zeroshard_kernels`) shadows PyPI's `kernels`,
    which transformers imports when installed (it depends on it), whenever the repo root is on
    the path (pytest puts it first). Import the installed one first, with the root off the
    path; the module cache then answers every later `import kernels`."""
    root = str(Path(__file__).resolve().parents[1])
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if p not in ("", ".", root)]
    try:
        import kernels  # noqa: F401
    except ImportError:
        pass
    finally:
        sys.path[:] = saved


_import_pypi_kernels()

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

"""A save or load entered by only some ranks (`if rank == 0: save_checkpoint(...)`) ends
within the arrival deadline with an error naming the call and the missing ranks, at stages
2 and 3; a rank arriving after the others gave up raises at once; the ranks stay in step, so
the next call made on every rank works."""

from __future__ import annotations

import os
import time

import pytest
import torch.distributed as dist

import zeroshard
from tests.ckpt_jobs import build, train

DEADLINE = 3.0
ENV = "ZEROSHARD_CKPT_ARRIVAL_TIMEOUT_S"  # the deadline setting


def _timed(fn, *args, **kwargs) -> tuple[str, float]:
    t0 = time.monotonic()
    try:
        fn(*args, **kwargs)
        msg = ""
    except zeroshard.CheckpointError as e:
        msg = str(e)
    return msg, time.monotonic() - t0


def job_partial(root: str, stage: int) -> dict:
    rank = dist.get_rank()
    os.environ[ENV] = str(DEADLINE)
    try:
        model, opt = build(stage, "fp32")
        train(model, opt, 0, 1)
        out = {}
        # rank 0 alone saves; rank 1 comes late to the same call
        if rank == 0:
            out["alone"] = _timed(zeroshard.save_checkpoint, root, model, opt, tag="x")
        dist.barrier()
        if rank == 1:
            out["late"] = _timed(zeroshard.save_checkpoint, root, model, opt, tag="x")
        # rank 1 alone loads; rank 0 comes late
        if rank == 1:
            out["alone"] = _timed(zeroshard.load_checkpoint, root, model, opt)
        dist.barrier()
        if rank == 0:
            out["late"] = _timed(zeroshard.load_checkpoint, root, model, opt)
        # every rank: works
        out["together"] = _timed(zeroshard.save_checkpoint, root, model, opt, tag="y")
        out["latest"] = open(f"{root}/latest").read()
        return out
    finally:
        del os.environ[ENV]


@pytest.mark.parametrize("stage", [2, 3])
def test_partial_entry_ends_with_named_error(dist_run, tmp_path, stage):
    r0, r1 = dist_run(2, job_partial, str(tmp_path), stage, timeout=120)
    for r, call, other in ((r0, "save_checkpoint", 1), (r1, "load_checkpoint", 0)):
        msg, seconds = r["alone"]
        print(f"stage {stage}: {call} on one rank: {seconds:.2f} s: {msg}")
        assert msg.startswith(f"{call}: rank(s) [{other}] did not enter {call} within 3 s"), msg
        assert DEADLINE <= seconds < DEADLINE + 5
    for r, call in ((r1, "save_checkpoint"), (r0, "load_checkpoint")):
        msg, seconds = r["late"]
        assert "after the other ranks stopped waiting for it" in msg and call in msg, msg
        assert seconds < 2
    for r in (r0, r1):
        assert r["together"][0] == "" and r["latest"] == "y"

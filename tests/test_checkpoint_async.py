"""`async_save=True`: the snapshot is taken at the call (training right after it does not leak
into the files), the write runs while the ranks keep training with collectives, and a failed
background save raises at the next wait."""

from __future__ import annotations

import pytest

import zeroshard
from tests.ckpt_jobs import build, full_state, train


def job_async(root: str) -> list[float]:
    model, opt = build(2, "fp32")
    train(model, opt, 0, 2)
    zeroshard.save_checkpoint(root + "/sync", model, opt, tag="t", client_state={"step": 2})
    zeroshard.save_checkpoint(root + "/async", model, opt, tag="t", client_state={"step": 2},
                              async_save=True)  # fmt: skip
    losses = train(model, opt, 2, 3)  # collectives on the main group while the thread writes
    zeroshard.checkpoint.wait()
    return losses


def test_async_save_matches_sync(dist_run, tmp_path):
    dist_run(2, job_async, str(tmp_path))
    a, s = full_state(str(tmp_path / "async")), full_state(str(tmp_path / "sync"))
    assert sorted(a) == sorted(s) and len(a) > 40
    for k in a:
        assert a[k].equal(s[k]), k
    assert (tmp_path / "async" / "latest").read_text() == "t"


def test_async_error_surfaces_at_next_wait(tmp_path):
    model, opt = build(1, "fp32")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    zeroshard.save_checkpoint(blocker, model, opt, tag="t", async_save=True)
    with pytest.raises(zeroshard.CheckpointError, match="checkpoint save to .*file/t failed"):
        zeroshard.checkpoint.wait()
    zeroshard.checkpoint.wait()  # reported once

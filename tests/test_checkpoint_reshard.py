"""Resharding matrix: checkpoints saved at (2 ranks, stage 2, fp32) and (4 ranks, stage 3,
bf16) resume at (1, stage 1), (3, stage 0), (4, stage 3) and (2, stage 2, fp32) with other
bucket sizes, and the resumed losses equal the uninterrupted run's.

bf16 note: a bf16 run at another world size is not the same computation as the 4-rank run
(per-rank bf16 gradients are rounded before the average), so the uninterrupted 4-rank run is
the loss reference only at 4 ranks. At the other sizes the test asserts the stronger fact
the resume rests on: re-saving right after the load reproduces every saved tensor (fp32
master and both Adam moments, whole) bit for bit."""

from __future__ import annotations

import pytest
import torch

from tests.ckpt_jobs import full_state, job_resume, job_train_save

SAVE_AT, TOTAL = 2, 4
TARGETS = [(1, 1), (3, 0), (4, 3), (2, 2)]
RESULTS: dict = {}


def _rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, dist_run):
    fp32 = str(tmp_path_factory.mktemp("fp32"))
    bf16 = str(tmp_path_factory.mktemp("bf16"))
    ref32 = dist_run(2, job_train_save, fp32, 2, "fp32", SAVE_AT, TOTAL)[0]
    ref16 = dist_run(4, job_train_save, bf16, 3, "bf16", SAVE_AT, TOTAL)[0]
    return {"fp32": (fp32, ref32), "bf16": (bf16, ref16)}


@pytest.mark.parametrize("world,stage", TARGETS)
def test_resume_fp32_checkpoint(saved, dist_run, world, stage):
    root, ref = saved["fp32"]
    got = dist_run(world, job_resume, root, stage, "fp32", TOTAL - SAVE_AT, 333)[0]
    assert got["start"] == SAVE_AT
    err = _rel(got["losses"], ref[SAVE_AT:])
    RESULTS[("fp32", world, stage)] = err
    print(f"fp32 (2, s2) -> ({world}, s{stage}): max rel loss error {err:.2e}")
    assert err <= 1e-5


@pytest.mark.parametrize("world,stage", TARGETS[:3])
def test_resume_bf16_checkpoint(saved, dist_run, tmp_path, world, stage):
    root, ref = saved["bf16"]
    again = str(tmp_path / "again")
    got = dist_run(world, job_resume, root, stage, "bf16", TOTAL - SAVE_AT, 333, again)[0]
    err = _rel(got["losses"], ref[SAVE_AT:])
    print(f"bf16 (4, s3) -> ({world}, s{stage}) bf16: max rel loss error {err:.2e}")
    before, after = full_state(root), full_state(again)
    assert sorted(before) == sorted(after) and len(before) > 40
    for k in before:
        assert torch.equal(before[k], after[k]), k
    if world == 4:
        assert err <= 1e-5


def test_bf16_checkpoint_into_fp32(saved, dist_run):
    """A bf16 run's fp32 master and moments continue in an fp32 model. The reference is the
    same continuation at another world size, stage and bucket size (1 rank, stage 0): both
    start from the saved fp32 state exactly, so they must agree."""
    root, _ = saved["bf16"]
    got = dist_run(2, job_resume, root, 2, "fp32", TOTAL - SAVE_AT, 333)[0]
    ref = dist_run(1, job_resume, root, 0, "fp32", TOTAL - SAVE_AT, 10_000)[0]
    err = _rel(got["losses"], ref["losses"])
    print(f"bf16 (4, s3) -> (2, s2) fp32 vs (1, s0) fp32: max rel loss error {err:.2e}")
    assert err <= 1e-5

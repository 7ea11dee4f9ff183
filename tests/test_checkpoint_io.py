"""Whole checkpoints: save/load round trip on 2 ranks, and a failed save loses nothing."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import zeroshard
from tests.models import batch, loss_fn, make_model, param_groups
from zeroshard import load_checkpoint, save_checkpoint
from zeroshard.checkpoint import save as save_mod


def _train(model, opt, steps, start):
    rank, world = dist.get_rank(), dist.get_world_size()
    for step in range(start, start + steps):
        x, y = batch(step, 8)
        k = 8 // world
        opt.backward(loss_fn(model, x[rank * k : (rank + 1) * k], y[rank * k : (rank + 1) * k]))
        opt.step()
        opt.zero_grad()


def _build(stage, dtype):
    model = make_model().to(dtype)
    opt = zeroshard.ZeroOptimizer(param_groups(model), "adamw", stage=stage, lr=3e-3)
    return model, opt


def job_save_fail_load(root: str, stage: int, dtype: torch.dtype) -> dict:
    rank = dist.get_rank()
    model, opt = _build(stage, dtype)
    _train(model, opt, 2, 0)
    save_checkpoint(root, model, opt, tag="good", client_state={"step": 2})
    saved_bytes = {p.name: p.read_bytes() for p in _p(root, "good").iterdir()}
    _train(model, opt, 2, 2)
    want = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    # a save that fails on rank 1 only: every rank raises, "good" stays whole and latest
    original = save_mod.write_file
    if rank == 1:
        def broken(*args, **kwargs):
            raise OSError("disk full (simulated)")

        save_mod.write_file = broken
    failed = ""
    try:
        save_checkpoint(root, model, opt, tag="good")
    except RuntimeError as e:
        failed = str(e)
    save_mod.write_file = original
    after = {p.name: p.read_bytes() for p in _p(root, "good").iterdir()}

    model2, opt2 = _build(stage, dtype)
    _, client = load_checkpoint(root, model2, opt2)
    _train(model2, opt2, 2, 2)
    got = {n: p.detach().float().clone() for n, p in model2.named_parameters()}
    return {
        "failed": failed,
        "unchanged": after == saved_bytes,
        "latest": (_p(root) / "latest").read_text(),
        "leftovers": sorted(p.name for p in _p(root).iterdir() if p.name.startswith(".")),
        "client": client,
        "diff": max((got[n] - want[n]).abs().max().item() for n in want),
    }


def _p(*parts):
    from pathlib import Path

    return Path(*parts)


@pytest.mark.parametrize("stage,dtype", [(1, torch.float32), (2, torch.bfloat16)])
def test_save_load_and_failed_save(dist_run, tmp_path, stage, dtype):
    for rank, r in enumerate(dist_run(2, job_save_fail_load, str(tmp_path), stage, dtype)):
        assert "failed" in r["failed"] and "previous checkpoint is untouched" in r["failed"]
        assert "(rank 1: OSError: disk full (simulated))" in r["failed"], rank  # every rank
        assert r["unchanged"]
        assert r["latest"] == "good"
        assert r["leftovers"] == []
        assert r["client"] == {"step": 2}
        assert r["diff"] == 0.0


def test_load_without_checkpoint_names_the_folder(tmp_path):
    model, opt = make_model(), None
    with pytest.raises(zeroshard.CheckpointError, match=f"no checkpoint in {tmp_path}"):
        load_checkpoint(tmp_path, model, opt)


def job_node_local(base: str) -> dict:
    """Each rank saves into its own folder, as on node-local disks."""
    rank = dist.get_rank()
    model, opt = _build(2, torch.float32)
    _train(model, opt, 2, 0)
    save_checkpoint(f"{base}/node{rank}", model, opt, tag="t", client_state={"step": 2})
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_node_local_folders_brought_together(dist_run, tmp_path):
    import shutil

    want = dist_run(2, job_node_local, str(tmp_path))[0]
    node0, node1 = tmp_path / "node0" / "t", tmp_path / "node1" / "t"
    assert sorted(p.name for p in node1.iterdir()) == ["manifest.json", "rank00001.safetensors"]
    with pytest.raises(zeroshard.CheckpointError, match="rank00001.safetensors: missing"):
        load_checkpoint(tmp_path / "node0", make_model(), None)
    shutil.copy(node1 / "rank00001.safetensors", node0)
    model = make_model(3)
    _, client = load_checkpoint(tmp_path / "node0", model, None)
    assert client == {"step": 2}
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), want[n]), n

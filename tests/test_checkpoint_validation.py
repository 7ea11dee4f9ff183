"""A damaged checkpoint is refused on every rank, naming the file and the fault, before
anything is modified; a crafted pickle is never executed; client_state must be JSON."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import zeroshard
from tests.ckpt_jobs import build, good_checkpoint_and_target
from tests.ckpt_jobs import snapshot as _snapshot

MARKER = "pwned.txt"


class _Evil:
    """Unpickling this runs a shell command that creates MARKER."""

    def __init__(self, folder: str) -> None:
        self.cmd = f"touch {os.path.join(folder, MARKER)}"

    def __reduce__(self):
        return (os.system, (self.cmd,))


def _damage(folder: Path, case: str) -> str:
    """Damage a copy of the checkpoint; returns the file name the error must mention."""
    kind, fault = case.split(":")
    name = {"rank0": "rank00000.safetensors", "rank1": "rank00001.safetensors",
            "manifest": "manifest.json"}[kind]  # fmt: skip
    path = folder / name
    data = bytearray(path.read_bytes())
    if fault == "flip":
        data[len(data) * 2 // 3] ^= 0x5A
        path.write_bytes(bytes(data))
    elif fault == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif fault == "missing":
        path.unlink()
    elif fault == "pickle":  # a crafted pickle in place of the file
        path.write_bytes(pickle.dumps(_Evil(str(folder.parent))))
    return name


CASES = [f"{k}:{f}" for k in ("rank0", "rank1", "manifest")
         for f in ("flip", "truncate", "missing", "pickle")]  # fmt: skip


def job_damaged(root: str) -> dict:
    rank = dist.get_rank()
    model2, opt2, before = good_checkpoint_and_target(root)
    out = {}
    for i, case in enumerate(CASES):
        tag = f"bad{i}"
        if rank == 0:
            shutil.copytree(Path(root) / "good", Path(root) / tag)
            expect = _damage(Path(root) / tag, case)
        else:
            expect = ""
        dist.barrier()
        try:
            zeroshard.load_checkpoint(root, model2, opt2, tag=tag)
            msg = ""
        except zeroshard.CheckpointError as e:
            msg = str(e)
        after = _snapshot(model2, opt2)
        same = all(torch.equal(a, b) for a, b in zip(before, after))
        out[case] = {"msg": msg, "expect": expect, "untouched": same}
    out["pwned"] = (Path(root) / MARKER).exists()
    zeroshard.load_checkpoint(root, model2, opt2)  # the good one still loads
    out["loaded"] = not all(torch.equal(a, b) for a, b in zip(before, _snapshot(model2, opt2)))
    return out


def test_damaged_checkpoints_refused_everywhere(dist_run, tmp_path):
    results = dist_run(2, job_damaged, str(tmp_path))
    expect = results[0]
    for r in results:
        assert not r["pwned"]
        assert r["loaded"]
        for case in CASES:
            name = expect[case]["expect"]
            msg = r[case]["msg"]
            assert name in msg and "Nothing was modified" in msg, (case, msg)
            fault = case.split(":")[1]
            words = {"flip": ("sha256 mismatch", "checksum mismatch", "unreadable"),
                     "truncate": ("size", "unreadable"), "missing": ("missing",),
                     "pickle": ("size", "unreadable")}[fault]  # fmt: skip
            assert any(w in msg for w in words), (case, msg)
            assert r[case]["untouched"], case


def test_client_state_must_be_json(tmp_path):
    model, opt = build(1, "fp32")
    with pytest.raises(zeroshard.CheckpointError, match=r"client_state .*x\.t is a Tensor"):
        zeroshard.save_checkpoint(tmp_path, model, opt, client_state={"x": {"t": torch.ones(3)}})
    assert not any(tmp_path.iterdir())

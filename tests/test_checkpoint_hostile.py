"""Hostile checkpoint folders, as an adversary would build them (the manifest's checksum
recomputed after every edit, so only the checks behind it stand in the way): each raises
CheckpointError on every rank naming the file and the fault, in bounded time, with the model
and optimizer bytes unchanged; nothing outside the checkpoint folder is opened; a failure
inside the apply step is undone on every rank."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import zeroshard
from tests.ckpt_jobs import good_checkpoint_and_target
from tests.ckpt_jobs import snapshot as _snapshot
from zeroshard.checkpoint import load as load_mod
from zeroshard.checkpoint import manifest

R1 = "rank00001.safetensors"


def _edit(folder: Path, fn) -> None:
    """Apply `fn` to the manifest body and write it back with a recomputed checksum."""
    outer = json.loads((folder / "manifest.json").read_text())
    fn(outer["body"])
    (folder / "manifest.json").write_text(manifest.render(outer["body"]))


def _replace_file(folder: Path, name: str, data: bytes) -> None:
    """Put `data` in place of a rank file and make the manifest agree on size and sha256."""
    import hashlib

    (folder / name).write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    _edit(folder, lambda b: b["files"][name].update(size=len(data), sha256=sha))


def _rename_file(folder: Path, new: str) -> None:
    def fn(body):
        body["files"][new] = body["files"].pop(R1)

    _edit(folder, fn)


def _swap_pieces(body):
    a, b = body["files"]["rank00000.safetensors"], body["files"][R1]
    a["pieces"], b["pieces"] = b["pieces"], a["pieces"]


def _symlink(folder: Path, target: str, size: int | None = None) -> None:
    (folder / R1).unlink()
    os.symlink(target, folder / R1)
    if size is not None:
        _edit(folder, lambda b: b["files"][R1].update(size=size))


def _make(root: Path, case: str) -> tuple[str | None, str]:
    """Build hostile folder `case`; returns (tag to load or None for `latest`, fault words)."""
    folder = root / case
    shutil.copytree(root / "good", folder)
    outside = root.parent / "outside"
    if case == "big_header":  # header length 2**40 in an otherwise matching file
        _replace_file(folder, R1, struct.pack("<Q", 1 << 40) + b"{}" * 8)
        return case, f"{R1}: safetensors header of 1099511627776 bytes"
    if case == "pickle":
        _replace_file(folder, R1, pickle.dumps({"x": list(range(50))}))
        return case, f"{R1}: safetensors header of"
    if case == "swapped_pieces":
        _edit(folder, _swap_pieces)
        return case, "rank0000"  # the first file checked lacks the tensors listed for it
    if case == "steps_abc":
        _edit(folder, lambda b: b.update(steps="abc"))
        return case, "manifest.json: malformed manifest: body.steps"
    if case == "lr_string":
        _edit(folder, lambda b: b["param_groups"][0].update(lr="abc"))
        return case, "param_groups[0].lr = 'abc'"
    if case == "overlap":
        _edit(folder, lambda b: b["files"][R1]["pieces"].append(
            list(b["files"]["rank00000.safetensors"]["pieces"][0])))  # fmt: skip
        return case, "overlap"
    if case == "dotdot":
        (outside / "x").mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / R1, outside / "x" / R1)
        _rename_file(folder, f"../outside/x/{R1}")
        return case, 'names the file "../outside/x/rank00001.safetensors": not a plain name'

    if case == "absolute":
        _rename_file(folder, "/etc/hostname")
        return case, 'names the file "/etc/hostname": not a plain name'
    if case == "etc_hostname":
        _rename_file(folder, "../../etc/hostname")
        return case, 'names the file "../../etc/hostname": not a plain name'
    if case == "symlink_out":
        shutil.copy(folder / R1, outside / R1)
        _symlink(folder, str(outside / R1))
        return case, f"{R1}: a symlink leading outside the checkpoint folder"
    if case == "dev_zero":
        _symlink(folder, "/dev/zero", size=0)
        return case, f"{R1}: a symlink leading outside the checkpoint folder"
    if case == "fifo":
        (folder / R1).unlink()
        os.mkfifo(folder / R1)
        _edit(folder, lambda b: b["files"][R1].update(size=0))
        return case, f"{R1}: not a regular file"
    if case == "latest_path":
        shutil.copytree(root / "good", outside / "ckpt" / "good", dirs_exist_ok=True)
        (root / "latest").write_text("../outside/ckpt/good")
        return None, "latest names '../outside/ckpt/good' is not a checkpoint tag"
    if case == "tag_symlink":
        (root / "evil").symlink_to(outside / "ckpt" / "good")
        return "evil", "evil: leads outside"
    raise AssertionError(case)


CASES = ["big_header", "pickle", "swapped_pieces", "steps_abc", "lr_string", "overlap",
         "dotdot", "absolute", "etc_hostname", "symlink_out", "dev_zero", "fifo",
         "latest_path", "tag_symlink"]  # fmt: skip


def job_hostile(root: str) -> dict:
    rank, base = dist.get_rank(), Path(root)
    model2, opt2, before = good_checkpoint_and_target(root)
    out = {}
    for case in CASES:
        box = [_make(base, case) if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        tag, words = box[0]
        t0 = time.monotonic()
        try:
            zeroshard.load_checkpoint(root, model2, opt2, tag=tag)
            msg = ""
        except zeroshard.CheckpointError as e:
            msg = str(e)
        seconds = time.monotonic() - t0
        same = all(torch.equal(a, b) for a, b in zip(before, _snapshot(model2, opt2)))
        out[case] = {"msg": msg, "words": words, "untouched": same, "s": seconds}
        dist.barrier()
        if rank == 0 and case == "latest_path":
            (base / "latest").write_text("good")
    return out


def test_hostile_folders_refused_on_every_rank(dist_run, tmp_path):
    root = tmp_path / "ckpt"
    results = dist_run(2, job_hostile, str(root), timeout=240)
    for rank, r in enumerate(results):
        for case in CASES:
            got = r[case]
            print(f"rank {rank} {case}: {got['s']:.2f} s: {got['msg'].replace(str(root), 'R')}")
            assert got["words"] in got["msg"], (case, got["msg"])
            assert "Nothing was modified" in got["msg"], case
            assert got["untouched"], case
            assert got["s"] < 20, (case, got["s"])


class _FailingOpen:
    """safe_open whose third slice read fails (a disk error in the apply step)."""

    def __init__(self, real, counter: list[int]) -> None:
        self.real, self.counter = real, counter

    def __call__(self, *args, **kwargs):
        handle = self.real(*args, **kwargs)
        counter = self.counter

        class Handle:
            def get_tensor(self, key):
                return handle.get_tensor(key)

            def get_slice(self, key):
                counter[0] += 1
                if counter[0] == 3:
                    raise OSError("simulated read error")
                return handle.get_slice(key)

        return Handle()


def job_apply_fails(root: str, where: str) -> dict:
    """Rank 1's apply step fails at its third slice read ("read") or after the tensors,
    step counters and hyperparameters were written ("step")."""
    rank = dist.get_rank()
    model2, opt2, before = good_checkpoint_and_target(root)
    real_open, real_restore = load_mod.safe_open, load_mod.restore_optimizer

    def failing_restore(*args, **kwargs):
        real_restore(*args, **kwargs)
        raise OSError("simulated read error")

    if rank == 1 and where == "read":
        load_mod.safe_open = _FailingOpen(real_open, [0])
    if rank == 1 and where == "step":
        load_mod.restore_optimizer = failing_restore
    try:
        zeroshard.load_checkpoint(root, model2, opt2)
        msg = ""
    except zeroshard.CheckpointError as e:
        msg = str(e)
    finally:
        load_mod.safe_open, load_mod.restore_optimizer = real_open, real_restore
    same = all(torch.equal(a, b) for a, b in zip(before, _snapshot(model2, opt2)))
    zeroshard.load_checkpoint(root, model2, opt2)
    loaded = not all(torch.equal(a, b) for a, b in zip(before, _snapshot(model2, opt2)))
    return {"msg": msg, "untouched": same, "loaded": loaded}


@pytest.mark.parametrize("where", ["read", "step"])
def test_apply_failure_restores_every_rank(dist_run, tmp_path, where):
    for r in dist_run(2, job_apply_fails, str(tmp_path), where, timeout=240):
        assert "applying it failed (rank 1: OSError: simulated read error)" in r["msg"], r
        assert "every rank restored" in r["msg"]
        assert r["untouched"] and r["loaded"]

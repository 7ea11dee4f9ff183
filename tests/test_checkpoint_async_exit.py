"""An async save followed at once by `dist.destroy_process_group()` and exit: the save
completes and publishes a whole checkpoint (every rank's file), or, when a rank's write
fails, publishes nothing and every rank exits with code 1 and the error on stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import safetensors.torch
import torch

import zeroshard
from tests.ckpt_jobs import REPO, build
from tests.ckpt_jobs import free_port as _port

RUNS = 2  # "ok" runs (each one 2-rank job; all start at once)


def _launch(root: Path, mode: str) -> list[subprocess.Popen]:
    port = _port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")  # fmt: skip
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.ckpt_async_worker", str(root), mode], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        ))  # fmt: skip
    return procs


def test_async_save_then_destroy_process_group(tmp_path):
    runs = []
    for i, mode in enumerate(["fail1"] + ["ok"] * RUNS):
        root = tmp_path / f"run{i}"
        root.mkdir()
        runs.append((root, mode, _launch(root, mode)))
    t0 = time.monotonic()
    for root, mode, procs in runs:
        errs = [p.communicate(timeout=600)[1] for p in procs]
        codes = [p.returncode for p in procs]
        ckpt = root / "ckpt"
        if mode == "fail1":
            assert codes == [1, 1], (codes, errs)
            for err in errs:
                assert "zeroshard: background checkpoint save failed" in err, err
                assert "rank 1" in err and "blocker" in err, err
            assert not (ckpt / "latest").exists() and not (ckpt / "t").exists()
            assert [p.name for p in ckpt.iterdir()] == []
            continue
        assert codes == [0, 0], (codes, errs)
        assert (ckpt / "latest").read_text() == "t"
        body = json.loads((ckpt / "t" / "manifest.json").read_text())["body"]
        assert body["world_size"] == 2
        assert sorted(body["files"]) == ["rank00000.safetensors", "rank00001.safetensors"]
        model, _ = build(0, "fp32", seed=3)
        zeroshard.load_checkpoint(ckpt, model)
        ref = safetensors.torch.load_file(str(root / "ref.safetensors"))
        for n, p in model.named_parameters():
            assert torch.equal(p.detach(), ref[n]), n
    print(f"{RUNS} async saves + destroy_process_group published whole checkpoints; a failed "
          f"one exited 1 on both ranks ({time.monotonic() - t0:.1f} s)")

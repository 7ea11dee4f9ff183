"""One rank of a 2-rank run that starts an async save and destroys the process group right
after it, then exits. Mode "ok": a normal save; "fail1": rank 1's folder cannot be created
(its write fails, rank 0's does not). Run: python -m tests.ckpt_async_worker ROOT MODE."""

from __future__ import annotations

import sys
import warnings
from datetime import timedelta
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist

import zeroshard
from tests.ckpt_jobs import build, train


def main(root: str, mode: str) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    model, opt = build(2, "fp32")
    train(model, opt, 0, 2)
    if rank == 0:
        ref = {n: p.detach().clone() for n, p in model.named_parameters()}
        safetensors.torch.save_file(ref, f"{root}/ref.safetensors")
    target = Path(root) / "ckpt"
    if mode == "fail1" and rank == 1:
        target = Path(root) / "blocker"
        target.write_text("a file where rank 1's checkpoint folder should be")
    zeroshard.save_checkpoint(target, model, opt, tag="t", client_state={"step": 2},
                              async_save=True)  # fmt: skip
    train(model, opt, 2, 1)  # training goes on while the thread writes
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])

"""One rank of a 2-rank run that saves the tags in TAGS (comma-separated; step 2k for the
k-th save) and may be SIGKILLed inside the last save (the crash spec "<point>:<rank|all>" is
armed for the last save only; "async" makes that save an async one).
Run: python -m tests.ckpt_crash_worker ROOT TAGS [CRASH|-] [async]."""

from __future__ import annotations

import os
import sys
import warnings
from datetime import timedelta

import safetensors.torch
import torch
import torch.distributed as dist

import zeroshard
from tests.ckpt_jobs import build, train


def main(root: str, tags: str, crash: str = "-", mode: str = "sync") -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    model, opt = build(2, "fp32")
    names = tags.split(",")
    for k, tag in enumerate(names):
        step = 2 * (k + 1)
        train(model, opt, step - 2, 2)
        if dist.get_rank() == 0:  # the exact weights this save must restore
            ref = {n: p.detach().clone() for n, p in model.named_parameters()}
            safetensors.torch.save_file(ref, f"{root}/../ref{step}.safetensors")
        dist.barrier()
        last = k == len(names) - 1
        if last and crash != "-":
            os.environ["ZEROSHARD_CKPT_CRASH"] = crash
        zeroshard.save_checkpoint(root, model, opt, tag=tag, client_state={"step": step},
                                  async_save=last and mode == "async")  # fmt: skip
        zeroshard.checkpoint.wait()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])

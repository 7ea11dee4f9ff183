"""One rank of a 2-rank run that saves twice and may be SIGKILLed inside the second save
(the crash spec "<point>:<rank|all>" is armed for the second save only).
Run: python -m tests.ckpt_crash_worker ROOT TAG [CRASH]."""

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


def main(root: str, second_tag: str, crash: str = "") -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    model, opt = build(2, "fp32")
    for step, tag in ((2, "a"), (4, second_tag)):
        train(model, opt, step - 2, 2)
        if dist.get_rank() == 0:  # the exact weights this save must restore
            ref = {n: p.detach().clone() for n, p in model.named_parameters()}
            safetensors.torch.save_file(ref, f"{root}/../ref{step}.safetensors")
        dist.barrier()
        if step == 4 and crash:
            os.environ["ZEROSHARD_CKPT_CRASH"] = crash
        zeroshard.save_checkpoint(root, model, opt, tag=tag, client_state={"step": step})
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])

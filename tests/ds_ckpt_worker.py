"""One rank of a DeepSpeed (CPU, gloo) run that saves a checkpoint after SAVE_AT steps and
keeps training; rank 0 writes the per-step losses to OUT/losses.json.
Run: python -m tests.ds_ckpt_worker OUT STAGE PRECISION (with RANK/WORLD_SIZE/MASTER_* set)."""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

SAVE_AT, TOTAL, GLOBAL_BATCH = 2, 4, 12


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 33), nn.GELU(), nn.Linear(33, 40), nn.GELU(),
                         nn.Linear(40, 5))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 16, generator=g), torch.randint(0, 5, (GLOBAL_BATCH,),
                                                                       generator=g)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).float(), y)


def main(out: str, stage: str, precision: str) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    cfg = {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // int(os.environ["WORLD_SIZE"]),
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.1,
                                                  "torch_adam": True}},
        "zero_optimization": {"stage": int(stage), "reduce_bucket_size": 2000,
                              "allgather_bucket_size": 2000,
                              "stage3_param_persistence_threshold": 0},
    }  # fmt: skip
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=make_model(), model_parameters=None, config=cfg)
    rank, world = dist.get_rank(), dist.get_world_size()
    n = GLOBAL_BATCH // world
    losses = []
    for step in range(TOTAL):
        if step == SAVE_AT:
            engine.save_checkpoint(os.path.join(out, "ds"), tag="s2")
        x, y = batch(step)
        x = x[rank * n : (rank + 1) * n].to(next(engine.module.parameters()).dtype)
        loss = loss_of(engine, x, y[rank * n : (rank + 1) * n])
        engine.backward(loss)
        engine.step()
        t = loss.detach().float().reshape(1)
        dist.all_reduce(t)
        losses.append(t.item() / world)
    if rank == 0:
        with open(os.path.join(out, "losses.json"), "w") as f:
            json.dump(losses, f)
    # DeepSpeed keeps its process groups alive past destroy_process_group(), so their gloo
    # workers can still be finishing a work when CPython finalizes: the exit abort that
    # zeroshard's own exit handler prevents (zeroshard/shutdown.py). Same cure here.
    from zeroshard.shutdown import wait_for_idle_workers

    dist.barrier()
    wait_for_idle_workers()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])

"""A plain training script for `zeroshard run`: no config argument anywhere in it.

`zeroshard.initialize(model)` finds the config through ZEROSHARD_CONFIG, set by the launcher.
With `--no-init` the script never calls init_process_group (as README's example):
`zeroshard.initialize` starts it from the launcher's environment.
Writes one JSON file per rank (`--out DIR`) for tests/test_cli.py: ranks share stdout, where
their lines can interleave.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import zeroshard


def main() -> None:
    steps = int(sys.argv[sys.argv.index("--steps") + 1]) if "--steps" in sys.argv else 5
    if "--no-init" not in sys.argv:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 1))
    model, opt = zeroshard.initialize(model)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step % 2)
        x = torch.randn(16, 8, generator=g)
        y = x.sum(1, keepdim=True)
        loss = ((model(x[rank::world]) - y[rank::world]) ** 2).mean()
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    out = sys.argv[sys.argv.index("--out") + 1]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({
            "rank": rank, "world": world, "stage": opt.config.zero_optimization.stage,
            "config": os.environ["ZEROSHARD_CONFIG"], "losses": losses,
            "param_sum": sum(float(p.detach().double().sum()) for p in model.parameters()),
        }, f)  # fmt: skip
    print(f"rank {rank}: final loss {losses[-1]:.4f}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

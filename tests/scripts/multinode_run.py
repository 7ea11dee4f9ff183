"""One "node" of a 2-node torchrun job (each agent: --nnodes 2 --nproc_per_node 1, c10d
rendezvous on 127.0.0.1): zeroshard at stages 2 and 3 trains 10 steps saving at step 5
(under argv[2]), then a fresh model/optimizer resumes from it and redoes steps 5..10.
Rank 0 writes the losses as JSON to argv[1]."""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
import tiny_task  # noqa: E402

import zeroshard  # noqa: E402

torch.set_num_threads(1)
out, ckpt_root = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
results = {"world": world, "node_rank": int(os.environ["GROUP_RANK"])}
for stage in (2, 3):
    ckpt = os.path.join(ckpt_root, f"stage{stage}")
    model, opt = tiny_task.initialize(stage)
    losses = tiny_task.train_steps(model, opt, 0, 5, rank, world)
    zeroshard.save_checkpoint(ckpt, model, opt, client_state={"step": 5})
    losses += tiny_task.train_steps(model, opt, 5, 10, rank, world)
    model, opt = tiny_task.initialize(stage)
    _, client = zeroshard.load_checkpoint(ckpt, model, opt)
    resumed = tiny_task.train_steps(model, opt, client["step"], 10, rank, world)
    results[f"stage{stage}"] = {"losses": losses, "resumed": resumed}
if rank == 0:
    with open(out, "w") as f:
        json.dump(results, f)
dist.barrier()
dist.destroy_process_group()

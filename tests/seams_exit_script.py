"""A short 2-rank zeroshard run that ends WITHOUT destroy_process_group() (issue 8, item 10).

Run under torchrun (`--nproc_per_node 2`); argv[1] is the stage (0-3, default 2). The process
must exit 0: nothing zeroshard leaves behind may abort the interpreter at exit.
"""

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import zeroshard  # noqa: E402

torch.set_num_threads(1)
stage = int(sys.argv[1]) if len(sys.argv) > 1 else 2
dist.init_process_group("gloo")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
config = {
    "train_micro_batch_size_per_gpu": 4,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
    "zero_optimization": {"stage": stage, "reduce_bucket_size": 300,
                          "stage3_param_persistence_threshold": 0},
}
model, opt = zeroshard.initialize(model, config)
for _ in range(3):
    x = torch.randn(4, 16)
    loss = model(x).pow(2).mean()
    opt.backward(loss)
    opt.step()
    opt.zero_grad()
print(f"rank {dist.get_rank()} done", flush=True)

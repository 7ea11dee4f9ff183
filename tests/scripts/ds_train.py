"""A typical DeepSpeed training script (accumulation 2, clipping, bf16, ZeRO-2, a mid-run save
and a resume). `python ds_train.py ds|shim OUT.json CKPT_DIR` under torchrun; the two modes
differ only in the import line."""

import json
import sys

import torch
from torch import nn

if sys.argv[1] == "shim":
    import zeroshard.integrations.deepspeed as deepspeed
else:
    import deepspeed

torch.set_num_threads(1)
OUT, CKPT = sys.argv[2], sys.argv[3]
CONFIG = {
    "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
    "gradient_clipping": 0.5, "bf16": {"enabled": True}, "steps_per_print": 1000,
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.1,
                                              "torch_adam": True}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 3e-3,
                                                 "warmup_num_steps": 4}},
    "zero_optimization": {"stage": 2, "reduce_bucket_size": 100000,
                          "allgather_bucket_size": 100000},
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 32)
        self.body = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 64)

    def forward(self, x, y):
        h = self.emb(x)
        logits = self.head(h + self.body(h)).float()
        return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())


g = torch.Generator().manual_seed(0)
data = torch.utils.data.TensorDataset(torch.randint(0, 64, (128, 8), generator=g),
                                      torch.randint(0, 64, (128, 8), generator=g))


def engine_and_loader():
    torch.manual_seed(0)
    model = Net()
    engine, _, loader, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), training_data=data, config=CONFIG)
    return engine, loader


def train(engine, loader, start, stop, save_at=None):
    losses, norms = [], []
    for i, (x, y) in enumerate(loader):
        if i < start:
            continue
        if i == stop:
            break
        loss = engine(x.to(engine.device), y.to(engine.device))
        engine.backward(loss)
        boundary = engine.is_gradient_accumulation_boundary()
        engine.step()
        losses.append(loss.item())
        if boundary:
            norms.append(float(engine.get_global_grad_norm()))
        if i + 1 == save_at:
            engine.save_checkpoint(CKPT, client_state={"next": i + 1})
    return losses, norms


engine, loader = engine_and_loader()
losses, norms = train(engine, loader, 0, 16, save_at=8)
lr = engine.get_lr()
engine, loader = engine_and_loader()
path, client = engine.load_checkpoint(CKPT)
resumed, resumed_norms = train(engine, loader, client["next"], 16)
if engine.global_rank == 0:
    with open(OUT, "w") as f:
        json.dump({"losses": losses, "norms": norms, "resumed": resumed, "lr": lr,
                   "resumed_norms": resumed_norms, "steps": engine.global_steps,
                   "micro": engine.train_micro_batch_size_per_gpu(),
                   "gas": engine.gradient_accumulation_steps(), "world": engine.world_size}, f)
torch.distributed.barrier()
torch.distributed.destroy_process_group()

"""The drop-in way: a plain PyTorch loop where torch.optim.AdamW became zeroshard.

    torchrun --standalone --nproc_per_node 2 examples/dropin.py
    python examples/dropin.py            # one process works too
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import zeroshard
from zeroshard.demo.tiny_gpt import BigramLanguage, GPTConfig, TinyGPT


def main() -> None:
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(n_layer=2, n_embd=64))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    # was: torch.optim.AdamW([...], lr=1e-3)
    opt = zeroshard.ZeroOptimizer(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        "adamw", stage=2, lr=1e-3,
    )  # fmt: skip
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=30)
    lang = BigramLanguage(256)
    for step in range(30):
        x, y = lang.batch(8, 64, seed=step * 100 + rank)
        loss = model(x, y)
        loss.backward()
        norm = opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
        sched.step()
        if rank == 0 and step % 5 == 0:
            print(f"step {step:3d} loss {loss.item():.3f} grad norm {norm:.3f}", flush=True)
    if rank == 0:
        print("bytes held on rank 0:", opt.memory_report())
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

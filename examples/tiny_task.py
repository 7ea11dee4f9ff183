"""The small task the Ray and Spark examples train (and their tests check against AdamW):
a 2-layer TinyGPT on a bigram language, a global batch of 8 split evenly over the ranks."""

from __future__ import annotations

import torch

import zeroshard
from zeroshard.demo.tiny_gpt import BigramLanguage, GPTConfig, TinyGPT

GLOBAL_BATCH, SEQ, LR, CLIP = 8, 16, 3e-3, 1.0
LANG = BigramLanguage(64)


def config(stage: int) -> dict:
    """A DeepSpeed-style zeroshard config: AdamW, clipping, the given ZeRO stage."""
    return {
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.1}},
        "gradient_clipping": CLIP,
        "zero_optimization": {"stage": stage},
        "kernel": "torch",
    }


def build_model() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=64, block_size=SEQ))


def batch(step: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of the global batch of `step` (world 1: the whole batch)."""
    x, y = LANG.batch(GLOBAL_BATCH, SEQ, seed=step)
    n = GLOBAL_BATCH // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def train_steps(model, opt, start: int, stop: int, rank: int, world: int) -> list[float]:
    """zeroshard steps `start..stop-1`; returns the loss averaged over the ranks per step."""
    losses = []
    for step in range(start, stop):
        loss = model(*batch(step, rank, world))
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(mean)
        losses.append(mean.item() / world)
    return losses


def adamw_reference(steps: int) -> list[float]:
    """Single-process torch.optim.AdamW with clip_grad_norm_ on the whole global batch."""
    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    losses = []
    for step in range(steps):
        loss = model(*batch(step))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def initialize(stage: int):
    return zeroshard.initialize(build_model(), config(stage))

"""Models that exercise stage 3's module-tree corner cases (built from tests/models.py parts)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tests.models import DIM, HEADS, SEQ, VOCAB, Block, TinyTransformer, make_model


class ReusedBlock(nn.Module):
    """One block applied three times per forward (weights shared across "layers")."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.block = Block(DIM, HEADS)
        self.ln_f = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for _ in range(3):
            x = self.block(x)
        return self.head(self.ln_f(x))


class Checkpointed(TinyTransformer):
    """The core model with every block under activation checkpointing."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]].to(self.embed.weight.dtype)
        if self.reentrant:  # reentrant checkpoint needs an input that requires grad
            x = x.requires_grad_() if not x.requires_grad else x
        for b in self.blocks:
            x = checkpoint(b, x, use_reentrant=self.reentrant)
        return self.head(self.ln_f(x))


class TiedFLinear(nn.Module):
    """Output projection through `F.linear(x, self.embed.weight)`: a parameter used outside
    its owner's forward, by the root."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block(DIM, HEADS) for _ in range(2))
        self.ln_f = nn.LayerNorm(DIM)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for b in self.blocks:
            x = b(x)
        return F.linear(self.ln_f(x), self.embed.weight)


class SkipsBlock(TinyTransformer):
    """The second block runs on even calls only (a module, and its parameters, unused on some
    steps)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]].to(self.embed.weight.dtype)
        x = self.blocks[0](x)
        if self.calls % 2 == 0:
            x = self.blocks[1](x)
        self.calls += 1
        return self.head(self.ln_f(x))


FACTORIES = {
    "core": lambda: TinyTransformer(),
    "reused": ReusedBlock,
    "ckpt_reentrant": lambda: Checkpointed(True),
    "ckpt": lambda: Checkpointed(False),
    "tied_flinear": TiedFLinear,
    "skips": SkipsBlock,
}


def build(name: str, seed: int = 0, **kw) -> nn.Module:
    """Same seed, same weights, whatever the process."""
    if name == "core" and kw:
        return make_model(seed, **kw)
    torch.manual_seed(seed)
    return FACTORIES[name]()


__all__ = ["FACTORIES", "SEQ", "build"]

"""Models and data the tests build themselves (nothing is downloaded)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, DIM, HEADS, SEQ = 67, 24, 2, 9  # odd sizes: nothing divides the world size evenly


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        # no attention biases: the key bias gets an exactly-zero gradient, which Adam turns
        # from rounding noise into full-size updates and so into test flakiness
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True, bias=False)
        self.ln2 = nn.LayerNorm(dim)
        hidden = 3 * dim + 1
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """Two blocks, a tied input/output embedding (one Parameter in two modules) and a frozen
    parameter (positional table)."""

    def __init__(self, layers: int = 2, dim: int = DIM, vocab: int = VOCAB) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(SEQ, dim) * 0.02, requires_grad=False)
        self.blocks = nn.ModuleList(Block(dim, HEADS) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]].to(self.embed.weight.dtype)
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


def make_model(seed: int = 0, **kw) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer(**kw)


def param_groups(model: nn.Module, weight_decay: float = 0.1) -> list[dict]:
    """Two groups, like every GPT recipe: matrices decay, biases and norms do not."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0, "lr": 2e-3},
    ]


def batch(step: int, global_batch: int, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + step)
    tokens = torch.randint(0, VOCAB, (global_batch, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def example_input(model: nn.Module | None = None) -> torch.Tensor:
    """One sequence of token ids: what `zeroshard estimate --model tests.models:make_model`
    (and tests/test_estimate.py) runs the test models on to trace stage 3's schedule."""
    return batch(0, 1)[0]


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))

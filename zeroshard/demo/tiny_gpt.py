"""The demo's model and data: a small GPT and a synthetic language it can learn.

Nothing is downloaded: the "language" is a fixed random bigram chain with a few likely
successors per token, so the loss has somewhere to go (from ln(vocab) toward the chain's
entropy) and every rank can generate its own batches from a seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    vocab_size: int = 256
    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4
    block_size: int = 64


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(), nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """nanoGPT's shape: token + position embeddings, pre-norm blocks, a head tied to the token
    embedding."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.n_embd = cfg.n_embd
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


class BigramLanguage:
    """Sequences from a fixed random bigram chain: each token has `fanout` likely successors."""

    def __init__(self, vocab_size: int, fanout: int = 3, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        logits = torch.full((vocab_size, vocab_size), -8.0)
        succ = torch.randint(0, vocab_size, (vocab_size, fanout), generator=g)
        logits.scatter_(1, succ, torch.rand(vocab_size, fanout, generator=g) * 2)
        self.probs = logits.softmax(-1)
        self.vocab_size = vocab_size

    def entropy(self) -> float:
        """Mean per-token entropy (nats): the loss a perfect model would reach."""
        p = self.probs
        return float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())

    def batch(self, n: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        tok = torch.randint(0, self.vocab_size, (n,), generator=g)
        seq = [tok]
        for _ in range(length):
            tok = torch.multinomial(self.probs[tok], 1, generator=g).squeeze(1)
            seq.append(tok)
        s = torch.stack(seq, dim=1)
        return s[:, :-1], s[:, 1:]

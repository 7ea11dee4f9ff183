"""The tiny language model and data every Lightning script trains (one definition for all)."""

import lightning as L
import torch
from torch import nn


class TinyLM(L.LightningModule):
    """Embedding, a residual MLP and a head on random token pairs; records each loss."""

    samples = 160  # sequences in the train loader (batches of 4)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(64, 32)
        self.body = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 64)
        self.losses: list[float] = []

    def forward(self, x, y):
        h = self.emb(x)
        logits = self.head(h + self.body(h)).float()  # a no-op in fp32 and under autocast
        return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())

    def training_step(self, batch, batch_idx):
        loss = self(*batch)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randint(0, 64, (self.samples, 8), generator=g),
                                              torch.randint(0, 64, (self.samples, 8), generator=g))
        return torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)

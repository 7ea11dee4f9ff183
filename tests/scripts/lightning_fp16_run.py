"""Run under torchrun (2 gloo ranks): Lightning + AdamW with precision "16-mixed" under DDP
(autocast + torch's GradScaler) vs ZeroShardStrategy (autocast + fp16 weights, fp32 master,
zeroshard's loss scaler) at stages 2 and 3, accumulate 2, gradient_clip_val 0.3. At one
micro-batch rank 1 alone multiplies its loss by 1e8, so that step's fp16 gradients overflow.

On CPU Lightning turns precision="16-mixed" into "bf16-mixed" for every strategy but its own
DeepSpeed/FSDP/XLA ones, so both runs are given the plugin the Trainer builds for
"16-mixed" on a GPU: `MixedPrecision("16-mixed", "cpu")`. Every rank writes JSON to
argv[1].rank<r>."""

import json
import logging
import sys

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning_net import TinyLM

from zeroshard.integrations.lightning import ZeroShardStrategy

torch.set_num_threads(1)
logging.getLogger("lightning").setLevel(logging.ERROR)
logging.getLogger("zeroshard").setLevel(logging.ERROR)  # the expected overflow warning
OUT = sys.argv[1]
OVERFLOW_AT = 6  # micro-batch 0 of optimizer step 3


class Net(TinyLM):
    def __init__(self) -> None:
        super().__init__()
        self.scales: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        plugin = self.trainer.precision_plugin
        scaler = getattr(plugin, "scaler", None)  # DDP's GradScaler
        self.scales.append(scaler.get_scale() if scaler is not None
                           else self.trainer.optimizers[0].loss_scale)  # fmt: skip
        if batch_idx == OVERFLOW_AT and self.global_rank == 1:
            loss = loss * 1e8  # finite in fp32; its gradients overflow fp16 at scale 2**16
        return loss


def fit(strategy):
    model = Net()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=8,
        plugins=[MixedPrecision("16-mixed", "cpu")], accumulate_grad_batches=2,
        gradient_clip_val=0.3, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model)
    opt = trainer.optimizers[0]
    out = {"losses": model.losses, "scales": model.scales, "precision": trainer.precision}
    if not isinstance(strategy, str):
        out.update(config_precision=opt.config.precision, skipped=opt.skipped_steps)
    return out


results = {}
for name in ("ddp", "z2", "z3"):
    strategy = "ddp" if name == "ddp" else ZeroShardStrategy(config={
        "zero_optimization": {"stage": int(name[1])}, "kernel": "torch",
        # torch's GradScaler halves its scale at the first overflow; DeepSpeed's default
        # (hysteresis 2) waits for the second
        "fp16": {"hysteresis": 1}})  # fmt: skip
    results[name] = fit(strategy)
with open(f"{OUT}.rank{dist.get_rank()}", "w") as f:
    json.dump(results, f)
dist.barrier()
dist.destroy_process_group()

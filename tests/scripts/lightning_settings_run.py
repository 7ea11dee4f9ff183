"""Run under torchrun (2 gloo ranks): Lightning + AdamW + a per-step LambdaLR scheduler from
configure_optimizers, under DDP and under ZeroShardStrategy with a config that names only
the stage (accumulate 2, gradient_clip_val 0.3; the micro-batch size from the train loader);
bf16-true from the Trainer; a config that contradicts configure_optimizers, one whose
micro-batch size contradicts the loader's. Rank 0 writes JSON to argv[1]."""

import json
import logging
import sys

import lightning as L
import torch
import torch.distributed as dist
from lightning_net import TinyLM

from zeroshard.integrations.lightning import ZeroShardStrategy

torch.set_num_threads(1)
logging.getLogger("lightning").setLevel(logging.ERROR)
OUT = sys.argv[1]


class Net(TinyLM):
    samples = 96

    def __init__(self) -> None:
        super().__init__()
        self.lrs: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def fit(strategy, precision="32-true", steps=8):
    model = Net()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=steps, precision=precision,
        accumulate_grad_batches=2, gradient_clip_val=0.3, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model)
    return model, trainer


def error_of(fn) -> str:
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


results = {}
for name in ("ddp", "z2", "z3"):
    strategy = "ddp" if name == "ddp" else ZeroShardStrategy(
        config={"zero_optimization": {"stage": int(name[1])}, "kernel": "torch"})
    model, trainer = fit(strategy)
    opt = trainer.optimizers[0]
    results[name] = {"losses": model.losses, "lrs": model.lrs,
                     "gas": getattr(opt, "gradient_accumulation_steps", 2)}
    if name != "ddp":
        results[name]["batch"] = [opt.config.train_micro_batch_size_per_gpu,
                                  opt.config.gradient_accumulation_steps,
                                  opt.config.train_batch_size]
model, trainer = fit(ZeroShardStrategy(config={"zero_optimization": {"stage": 2}}),
                     precision="bf16-true", steps=1)
results["bf16"] = trainer.optimizers[0].config.precision
bad = {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 4,
       "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
results["mismatch"] = error_of(lambda: fit(ZeroShardStrategy(config=bad), steps=1))
micro = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 8}
results["micro"] = error_of(lambda: fit(ZeroShardStrategy(config=micro), steps=1))
if dist.get_rank() == 0:
    with open(OUT, "w") as f:
        json.dump(results, f)
dist.barrier()
dist.destroy_process_group()

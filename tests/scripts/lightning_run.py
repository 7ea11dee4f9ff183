"""Run under torchrun (2 gloo ranks): Lightning + AdamW under DDP vs ZeroShardStrategy at
stages 2 and 3 (accumulate 2, gradient_clip_val 0.3), and a resume from a step-10 checkpoint.
Rank 0 writes the per-step losses as JSON to argv[1]."""

import json
import logging
import os
import sys

import lightning as L
import torch
import torch.distributed as dist
from lightning_net import TinyLM

from zeroshard.integrations.lightning import ZeroShardStrategy

torch.set_num_threads(1)
logging.getLogger("lightning").setLevel(logging.ERROR)
OUT, WORK = sys.argv[1], sys.argv[2]


class Net(TinyLM):
    """The user's LightningModule (lightning_net.py): the strategy must train it unwrapped."""


class Record(L.Callback):
    """What the strategy trains (its wrapper, if any) and the optimizer's last norm."""

    def on_train_start(self, trainer, pl_module):
        self.model = type(trainer.strategy.model).__name__

    def on_train_end(self, trainer, pl_module):
        self.norm = getattr(trainer.optimizers[0], "last_grad_norm", None)


def fit(strategy, ckpt=None, save_dir=None):
    """20 optimizer steps = 2 epochs; with save_dir, a checkpoint at each epoch's end."""
    model, rec = Net(), Record()
    callbacks = [rec]
    if save_dir:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(
            dirpath=save_dir, save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True))
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=20,
        accumulate_grad_batches=2, gradient_clip_val=0.3, logger=False, callbacks=callbacks,
        enable_checkpointing=bool(save_dir), enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, ckpt_path=ckpt)
    return {"losses": model.losses, "model": rec.model, "norm": rec.norm}


def strategy(name):
    if name == "ddp":
        return "ddp"
    return ZeroShardStrategy(config={"zero_optimization": {"stage": int(name[1])},
                                     "kernel": "torch"})


results = {}
for name in ("ddp", "z2", "z3"):
    full = fit(strategy(name), save_dir=os.path.join(WORK, name))
    ck = os.path.join(WORK, name, "epoch=0-step=10.ckpt")
    full["resumed"] = fit(strategy(name), ckpt=ck)
    full["ckpt_is_dir"] = os.path.isdir(ck)
    results[name] = full
if dist.get_rank() == 0:
    with open(OUT, "w") as f:
        json.dump(results, f)
dist.barrier()
dist.destroy_process_group()

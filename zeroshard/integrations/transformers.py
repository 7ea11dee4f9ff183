"""`ZeroShardTrainer`: a `transformers.Trainer` whose optimizer is zeroshard (stages 0-3).

What it changes in Trainer (v5), and why:
- the optimizer comes from `zeroshard.initialize`, with HF's own weight-decay groups. Every
  Trainer setting the config leaves out or sets to `"auto"` is taken from `TrainingArguments`
  (lr, weight decay, betas, eps, warmup and total steps of a config scheduler, max_grad_norm,
  accumulation, micro-batch, bf16/fp16; optimizer type from `optim`), as HF's DeepSpeed
  integration and Accelerate do; a config value contradicting them is an error listing every
  mismatch, and rank 0 prints one line saying where each setting came from;
- the model is never wrapped in DDP or prepared by Accelerate: zeroshard reduces gradients
  itself, and a stage-3 model cannot run under DDP;
- clipping goes through `optimizer.clip_grad_norm_` (gradients live in the optimizer's flat
  buffers, not `param.grad`), and the true global norm is what gets logged as `grad_norm`;
- the optimizer's gradients are reset after every step (Trainer only calls `model.zero_grad()`);
- checkpoints: each `checkpoint-N` folder holds a zeroshard checkpoint (every rank's shard, the
  full weights, and the LR scheduler in its client state) under `zeroshard/`, and
  `resume_from_checkpoint` restores it exactly;
- `save_model` at stage 3 gathers the weights collectively on every rank (rank 0 keeps them),
  then rank 0 writes them: no hang, and no full gather run by one rank alone.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback

import zeroshard
from zeroshard.checkpoint.hf_export import HF_CONFIG_KEY
from zeroshard.config.honoured import hidden_size_of
from zeroshard.integrations.hf_config import HfAutoConfig
from zeroshard.stage3.state_dict import full_state_dict

CHECKPOINT_SUBDIR = "zeroshard"


class _ResetOptimizerGrads(TrainerCallback):
    """Trainer v5 clears gradients with `model.zero_grad()`, which does not reach zeroshard's
    flat gradient buffers; clear them right after each optimizer step."""

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        opt = kwargs.get("optimizer")
        if opt is not None:
            opt.zero_grad()


def _collective_save_pretrained(model: Any) -> None:
    """At stage 3, make `model.save_pretrained(dir)` (called on every rank, as HF documents for
    sharded models) gather the weights collectively with rank 0 alone keeping them, and write
    from the main process only."""
    original = model.save_pretrained

    def save_pretrained(save_directory: Any, *args: Any, state_dict: Any = None,
                        is_main_process: bool | None = None, **kwargs: Any) -> Any:  # fmt: skip
        if state_dict is None:
            state_dict = full_state_dict(model, rank0_only=True)
        if is_main_process is None:
            is_main_process = not dist.is_initialized() or dist.get_rank() == 0
        if not is_main_process:
            return None
        return original(save_directory, *args, state_dict=state_dict, is_main_process=True,
                        **kwargs)  # fmt: skip

    model.save_pretrained = save_pretrained


class ZeroShardTrainer(Trainer):
    """`Trainer(..., zeroshard_config=path_or_dict)`; everything else as in `Trainer`.

    The config is a DeepSpeed-style config (HF's templates with `"auto"` work; a config that
    names only the stage trains with `TrainingArguments`' settings). Do not pass
    `optimizers=`: the optimizer is zeroshard's. A scheduler in the config is used (stepped by
    Trainer); without one Trainer builds its own (`lr_scheduler_type`) on zeroshard's optimizer.
    Checkpoints carry the model's config, so `zeroshard consolidate` writes `config.json`.
    """

    def __init__(
        self, *args: Any, zeroshard_config: str | os.PathLike | Mapping[str, Any], **kwargs: Any
    ) -> None:
        opts = kwargs.get("optimizers")
        if opts is not None and opts[0] is not None:
            raise ValueError(
                "ZeroShardTrainer builds its optimizer from zeroshard_config; do not pass "
                "optimizers=(optimizer, ...)"
            )
        super().__init__(*args, **kwargs)
        self.zeroshard_config = HfAutoConfig(zeroshard_config)
        self.zeroshard_config.process(self.args)
        self._zs_max_steps = 0
        self.add_callback(_ResetOptimizerGrads())

    # -- optimizer and scheduler -----------------------------------------------------------
    def resolved_zeroshard_config(self) -> dict[str, Any]:
        """The config with every "auto" filled (needs the step count: call once training is
        being prepared)."""
        self.zeroshard_config.finalize(self.args, hidden_size_of(self.model), self._zs_max_steps)
        if self.args.process_index == 0:  # where each setting came from, once
            print(self.zeroshard_config.describe_sources(), file=sys.stderr, flush=True)
        return self.zeroshard_config.for_zeroshard()

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        cfg = self.resolved_zeroshard_config()
        model = self.model
        decay = set(self.get_decay_parameter_names(model))
        wd = float(cfg.get("optimizer", {}).get("params", {}).get("weight_decay", 0.0))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if n in decay], "weight_decay": wd},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        self.model, self.optimizer = zeroshard.initialize(model, cfg, model_parameters=groups)
        if self.optimizer.stage == 3 and hasattr(self.model, "save_pretrained"):
            _collective_save_pretrained(self.model)
        sched = getattr(self.optimizer, "lr_scheduler", None)
        if sched is not None:  # the config's scheduler: Trainer steps it (and only Trainer)
            self.optimizer.lr_scheduler = None
            self.lr_scheduler = sched
        return self.optimizer

    @property
    def zero_stage(self) -> int:
        return int(self.optimizer.stage) if self.optimizer is not None else -1

    def _prepare_for_training(self, max_steps: int, train_dataloader: Any, resume: Any) -> Any:
        """Trainer's preparation minus every wrapper: no DDP, no Accelerate optimizer."""
        if self._created_lr_scheduler:
            self.lr_scheduler = None
            self._created_lr_scheduler = False
        self._zs_max_steps = max_steps
        self.create_optimizer()
        self.create_scheduler(num_training_steps=max_steps, optimizer=self.optimizer)
        self.model_wrapped = self.model
        if resume is not None:
            self._load_optimizer_and_scheduler(resume)
        for attr in ("model", "optimizer", "lr_scheduler"):
            setattr(self.callback_handler, attr, getattr(self, attr))
        self.callback_handler.train_dataloader = train_dataloader
        return self.model, train_dataloader

    # -- clipping and the logged norm --------------------------------------------------------
    def _clip_grad_norm(self, model: Any) -> torch.Tensor:
        return self.optimizer.clip_grad_norm_(self.args.max_grad_norm)

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        if grad_norm is None:  # no clipping asked: the norm alone (coefficient 1)
            grad_norm = self.optimizer.clip_grad_norm_(float("inf"))
        return grad_norm

    # -- checkpoints -----------------------------------------------------------------------
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        client = {"lr_scheduler": self.lr_scheduler.state_dict()} if self.lr_scheduler else {}
        config = getattr(self.model, "config", None)
        if hasattr(config, "to_dict"):  # so that `zeroshard consolidate` writes config.json
            client[HF_CONFIG_KEY] = json.loads(config.to_json_string())
        zeroshard.save_checkpoint(
            os.path.join(output_dir, CHECKPOINT_SUBDIR), self.model, self.optimizer,
            tag="state", client_state=client,
        )  # fmt: skip

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or self.optimizer is None:
            return
        folder = os.path.join(checkpoint, CHECKPOINT_SUBDIR)
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"{checkpoint} has no {CHECKPOINT_SUBDIR}/ folder: it was not saved by "
                "ZeroShardTrainer, so the optimizer state cannot be restored"
            )
        _, client = zeroshard.load_checkpoint(folder, self.model, self.optimizer, tag="state")
        if self.lr_scheduler is not None and "lr_scheduler" in client:
            self.lr_scheduler.load_state_dict(client["lr_scheduler"])

    def _save_scaler(self, output_dir: str) -> None:
        """zeroshard's loss scaler (fp16) is inside its checkpoint."""

    def _load_scaler(self, checkpoint: str | None) -> None:
        """See `_save_scaler`."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Call on every rank (Trainer does). At stage 3 every rank takes part in the gather;
        rank 0 alone holds the full weights and writes them."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        state_dict = None
        if self.zero_stage == 3:
            state_dict = full_state_dict(self.model, rank0_only=True)
        if self.args.should_save:
            self._save(output_dir, state_dict=state_dict)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

"""`ZeroShardStrategy`: Lightning's DDP strategy with zeroshard in place of DDP (stages 0-3).

What differs from `DDPStrategy`, and why:
- the model is never wrapped in `DistributedDataParallel`: zeroshard reduces the gradients
  itself (a stage-3 model cannot run under DDP);
- the optimizer is built by `zeroshard.initialize` from the config; without an `"optimizer"`
  section the type and param groups of `configure_optimizers()`'s optimizer are used (AdamW,
  Adam or SGD; schedulers go in the config's `"scheduler"` section);
- `gradient_clip_val` clips through `optimizer.clip_grad_norm_` (the gradients live in the
  optimizer's flat buffers, not `param.grad`);
- checkpoints are zeroshard checkpoints (a folder at the `.ckpt` path): every rank saves its
  shard and restores it, the weights are saved once, and Lightning's loop state travels in
  the client state. Resuming (`ckpt_path=`) is exact.
"""

from __future__ import annotations

import os
import types
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

import zeroshard
from zeroshard.integrations.hf_config import read_config

_TYPES = {torch.optim.AdamW: "AdamW", torch.optim.Adam: "Adam", torch.optim.SGD: "SGD"}
_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "momentum", "dampening", "nesterov")
_NOT_SAVED = ("state_dict", "optimizer_states")
_SCHED_KEY = "zeroshard_lr_scheduler"


def _clip_grad_by_norm(plugin: Any, optimizer: Any, clip_val: float) -> None:
    optimizer.clip_grad_norm_(float(clip_val))


def _clip_grad_by_value(plugin: Any, optimizer: Any, clip_val: float) -> None:
    raise ValueError(
        "ZeroShardStrategy: gradient_clip_algorithm='value' is not supported (gradients are "
        "sharded across ranks); use the default 'norm'"
    )


class _Stage3Root(nn.Module):
    """At stage 3 zeroshard needs each training step to enter through the root module's
    forward (that is where its gather schedule starts and ends). Lightning routes
    `training_step` through a wrapper's forward exactly as it does for DDP."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


class ZeroShardStrategy(DDPStrategy):
    """`Trainer(strategy=ZeroShardStrategy(config=path_or_dict), accelerator=..., devices=N)`."""

    strategy_name = "zeroshard"

    def __init__(self, config: str | os.PathLike | Mapping[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.zeroshard_config = read_config(config)

    # -- no DDP, zeroshard's optimizer, clipping through it ------------------------------------
    def configure_ddp(self) -> None:
        """Nothing to wrap: zeroshard's optimizer reduces the gradients."""

    def setup(self, trainer: Any) -> None:
        plugin = self.precision_plugin
        plugin.clip_grad_by_norm = types.MethodType(_clip_grad_by_norm, plugin)
        plugin.clip_grad_by_value = types.MethodType(_clip_grad_by_value, plugin)
        super().setup(trainer)

    def _config_for(self, trainer: Any) -> tuple[dict[str, Any], Any]:
        cfg = dict(self.zeroshard_config)
        cfg.setdefault("gradient_accumulation_steps", int(trainer.accumulate_grad_batches))
        if "optimizer" in cfg:
            return cfg, None
        optimizers, schedulers = _init_optimizers_and_lr_schedulers(self.lightning_module)
        if len(optimizers) != 1 or schedulers:
            raise ValueError(
                "ZeroShardStrategy: configure_optimizers must return exactly one optimizer and "
                "no scheduler (put schedulers in the config's \"scheduler\" section), or give "
                "the config an \"optimizer\" section"
            )
        user = optimizers[0]
        kind = _TYPES.get(type(user))
        if kind is None:
            raise ValueError(
                f"ZeroShardStrategy: cannot take over {type(user).__name__} from "
                f"configure_optimizers (supported: {', '.join(_TYPES.values())}); describe the "
                "optimizer in the config's \"optimizer\" section"
            )
        defaults = {k: v for k, v in user.defaults.items() if k in _GROUP_KEYS}
        if "betas" in defaults:
            defaults["betas"] = list(defaults["betas"])
        cfg["optimizer"] = {"type": kind, "params": defaults}
        groups = [
            {k: v for k, v in g.items() if k == "params" or k in _GROUP_KEYS}
            for g in user.param_groups
        ]
        return cfg, groups

    def setup_optimizers(self, trainer: Any) -> None:
        cfg, groups = self._config_for(trainer)
        root: nn.Module = self.lightning_module
        if int(cfg.get("zero_optimization", {}).get("stage", 0)) == 3:
            root = _Stage3Root(root)
        self.model, opt = zeroshard.initialize(root, cfg, model_parameters=groups)
        self.optimizers = [opt]
        self.lr_scheduler_configs = []

    # -- checkpoints: every rank's shard, in zeroshard's format ----------------------------
    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the optimizer must exist to take its shard

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False  # restored by load_checkpoint

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return {}  # the weights go into the zeroshard checkpoint (no full gather per rank)

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        return {}

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any,
                        storage_options: Any = None) -> None:  # fmt: skip
        """Every rank (Lightning calls it on all): a zeroshard checkpoint folder at
        `filepath`."""
        client = {k: v for k, v in checkpoint.items() if k not in _NOT_SAVED}
        opt = self.optimizers[0]
        if getattr(opt, "lr_scheduler", None) is not None:
            client[_SCHED_KEY] = opt.lr_scheduler.state_dict()
        zeroshard.save_checkpoint(filepath, self.model, opt, tag="state",
                                  client_state=client)  # fmt: skip

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Any = None) -> dict[str, Any]:
        if not os.path.isdir(checkpoint_path):
            raise FileNotFoundError(
                f"{checkpoint_path} is not a ZeroShardStrategy checkpoint folder (those are "
                "saved by ZeroShardStrategy, one shard per rank)"
            )
        opt = self.optimizers[0]
        _, client = zeroshard.load_checkpoint(checkpoint_path, self.model, opt,
                                              tag="state")  # fmt: skip
        client = dict(client)
        sched = client.pop(_SCHED_KEY, None)
        if sched is not None and getattr(opt, "lr_scheduler", None) is not None:
            opt.lr_scheduler.load_state_dict(sched)
        client["state_dict"] = {}
        return client

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """Loaded with the optimizer shard in `load_checkpoint`."""

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Loaded in `load_checkpoint`."""

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            import shutil

            shutil.rmtree(filepath, ignore_errors=True)

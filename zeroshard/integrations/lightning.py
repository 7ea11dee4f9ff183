"""`ZeroShardStrategy`: Lightning's DDP strategy with zeroshard in place of DDP (stages 0-3).

What differs from `DDPStrategy`, and why:
- the model is never wrapped in `DistributedDataParallel`: zeroshard reduces the gradients
  itself (a stage-3 model cannot run under DDP);
- the optimizer is built by `zeroshard.initialize` from the config, with every setting it
  leaves out taken from the Trainer and `configure_optimizers()` (optimizer type, param
  groups and hyperparameters, accumulate_grad_batches, bf16 precision); a config value that
  contradicts them is an error listing each. Schedulers from `configure_optimizers()` are
  stepped by Lightning as usual (zeroshard's groups follow them before each step);
- `gradient_clip_val` clips through `optimizer.clip_grad_norm_` (the gradients live in the
  optimizer's flat buffers, not `param.grad`);
- checkpoints are zeroshard checkpoints (a folder at the `.ckpt` path): every rank saves its
  shard and restores it, the weights are saved once, and Lightning's loop state travels in
  the client state. Resuming (`ckpt_path=`) is exact.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import types
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

import zeroshard
from zeroshard.config.schema import ConfigError
from zeroshard.integrations.hf_config import read_config

_TYPES = {torch.optim.AdamW: "AdamW", torch.optim.Adam: "Adam", torch.optim.SGD: "SGD"}
_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "momentum", "dampening", "nesterov")
_NOT_SAVED = ("state_dict", "optimizer_states")
_SCHED_KEY = "zeroshard_lr_scheduler"


def _node(cfg: dict[str, Any], key: str) -> tuple[dict[str, Any], str]:
    *parents, leaf = key.split(".")
    for p in parents:
        cfg = cfg.setdefault(p, {})
    return cfg, leaf


def _follow(user: torch.optim.Optimizer) -> Any:
    """A step pre-hook copying the user's optimizer's hyperparameters (moved by the
    Lightning-stepped scheduler) into zeroshard's matching param groups."""

    def hook(optimizer: Any, args: Any, kwargs: Any) -> None:
        for ours, theirs in zip(optimizer.param_groups, user.param_groups):
            for k in _GROUP_KEYS:
                if k in ours and k in theirs:
                    ours[k] = theirs[k]

    return hook


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

    def _config_for(self, trainer: Any) -> tuple[dict[str, Any], Any, Any, list]:
        """(config with the Trainer's settings filled in, param groups, the user's optimizer,
        its scheduler configs); a config value contradicting the Trainer is an error listing
        every mismatch. Rank 0 says where each setting came from."""
        cfg = copy.deepcopy(self.zeroshard_config)
        optimizers, schedulers = _init_optimizers_and_lr_schedulers(self.lightning_module)
        if len(optimizers) > 1:
            raise ValueError("ZeroShardStrategy: configure_optimizers must return at most one "
                             "optimizer (zeroshard trains all parameters with one)")
        user = optimizers[0] if optimizers else None
        if schedulers and "scheduler" in cfg:
            raise ValueError(
                "ZeroShardStrategy: configure_optimizers returns a scheduler and the config has "
                'a "scheduler" section too; keep one of them'
            )
        sources, mismatches = {}, []

        def settle(key: str, value: Any, name: str) -> None:
            node, leaf = _node(cfg, key)
            same = (str(node.get(leaf)).lower() == str(value).lower() if key.endswith(".type")
                    else node.get(leaf) == value)  # fmt: skip
            if leaf in node and not same:
                mismatches.append(f"`{key}` = {json.dumps(node[leaf])} in the config "
                                  f"contradicts the Trainer's {name} = {json.dumps(value)}")
            sources[key] = "config" if leaf in node else name
            node.setdefault(leaf, value)

        settle("gradient_accumulation_steps", int(trainer.accumulate_grad_batches),
               "accumulate_grad_batches")  # fmt: skip
        if "gradient_clipping" in cfg:  # Lightning clips through the optimizer itself
            settle("gradient_clipping", float(trainer.gradient_clip_val or 0.0),
                   "gradient_clip_val")  # fmt: skip
        precision = str(trainer.precision)
        if precision.startswith("16"):
            raise ValueError(
                f"ZeroShardStrategy: precision={precision!r} (torch's GradScaler cannot see "
                "zeroshard's sharded gradients) is not supported; use 'bf16-mixed' or "
                "'bf16-true', or '32-true'"
            )
        if "bfloat16" not in cfg:
            settle("bf16.enabled", precision.startswith("bf16"), f"precision={precision!r}")
        groups = None
        if user is not None:
            kind = _TYPES.get(type(user))
            if kind is None:
                raise ValueError(
                    f"ZeroShardStrategy: cannot take over {type(user).__name__} from "
                    f"configure_optimizers (supported: {', '.join(_TYPES.values())}); describe "
                    "the optimizer in the config's \"optimizer\" section"
                )
            defaults = {k: v for k, v in user.defaults.items() if k in _GROUP_KEYS}
            if "betas" in defaults:
                defaults["betas"] = list(defaults["betas"])
            settle("optimizer.type", kind, "configure_optimizers() optimizer")
            if str(_node(cfg, "optimizer.type")[0]["type"]).lower() == kind.lower():
                for k, v in defaults.items():
                    settle(f"optimizer.params.{k}", v, f"configure_optimizers() {k}")
            groups = [{k: v for k, v in g.items() if k == "params" or k in _GROUP_KEYS}
                      for g in user.param_groups]  # fmt: skip
        if mismatches:
            raise ConfigError(mismatches)
        if self.is_global_zero:
            given = sorted(k for k, v in sources.items() if v == "config")
            taken = sorted(f"{k} ({v})" for k, v in sources.items() if v != "config")
            sched = ", ".join(type(c.scheduler).__name__ for c in schedulers) or (
                "the config's" if "scheduler" in cfg else "none")  # fmt: skip
            print(f"zeroshard: from the Lightning Trainer: {', '.join(taken) or 'none'}; from "
                  f"the config: {', '.join(given) or 'none'}; scheduler: {sched}",
                  file=sys.stderr, flush=True)  # fmt: skip
        return cfg, groups, user, schedulers

    def setup_optimizers(self, trainer: Any) -> None:
        cfg, groups, user, schedulers = self._config_for(trainer)
        root: nn.Module = self.lightning_module
        if int(cfg.get("zero_optimization", {}).get("stage", 0)) == 3:
            root = _Stage3Root(root)
        self.model, opt = zeroshard.initialize(root, cfg, model_parameters=groups)
        self.optimizers = [opt]
        # configure_optimizers' schedulers stay on the user's optimizer and Lightning steps
        # them as usual; before each step zeroshard's groups take their hyperparameters
        self.lr_scheduler_configs = list(schedulers)
        self._follow = None
        if schedulers and user is not None:
            self._follow = _follow(user)
            opt.register_step_pre_hook(self._follow)

    def on_train_batch_start(self, batch: Any, batch_idx: int, *args: Any) -> None:
        """The scheduler's new values are visible from the batch after it stepped."""
        if getattr(self, "_follow", None) is not None:
            self._follow(self.optimizers[0], (), {})
        super().on_train_batch_start(batch, batch_idx, *args)

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

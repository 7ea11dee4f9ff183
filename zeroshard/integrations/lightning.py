"""`ZeroShardStrategy`: Lightning's DDP strategy with zeroshard in place of DDP (stages 0-3).

What differs from `DDPStrategy`, and why:
- the model is never wrapped in `DistributedDataParallel`: zeroshard reduces the gradients
  itself (a stage-3 model cannot run under DDP);
- the optimizer is built by `zeroshard.initialize` from the config, with every setting it
  leaves out taken from the Trainer and `configure_optimizers()` (optimizer type, param
  groups and hyperparameters, accumulate_grad_batches, bf16/fp16 precision, the train data
  loader's batch size); a config value that contradicts them is an error listing each.
  Schedulers from `configure_optimizers()` are stepped by Lightning as usual (zeroshard's
  groups follow them before each step);
- the Trainer's precision plugin keeps what happens around the forward (autocast, casts) and
  hands the gradients to zeroshard (`ZeroShardPrecision`): "16-mixed"/"16-true" train fp16
  with zeroshard's loss scaler, as Lightning's DeepSpeedStrategy maps them to DeepSpeed's fp16;
  `gradient_clip_val` clips through `optimizer.clip_grad_norm_` (the gradients live in the
  optimizer's flat buffers, not `param.grad`);
- checkpoints are zeroshard checkpoints (a folder at the `.ckpt` path): every rank saves its
  shard and restores it, the weights are saved once, and Lightning's loop state travels in
  the client state. Resuming (`ckpt_path=`) is exact.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers
from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

import zeroshard
from zeroshard.config.honoured import BATCH_AUTOS
from zeroshard.config.schema import ConfigError, load_config
from zeroshard.integrations.hf_config import read_config

_TYPES = {torch.optim.AdamW: "AdamW", torch.optim.Adam: "Adam", torch.optim.SGD: "SGD"}
_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "momentum", "dampening", "nesterov")
_NOT_SAVED = ("state_dict", "optimizer_states")
_SCHED_KEY = "zeroshard_lr_scheduler"
# the Trainer's precision -> the config section it enables (Lightning's DeepSpeedStrategy maps
# them the same way onto DeepSpeed's fp16/bf16 sections)
_HALF = {"32-true": None, "bf16-mixed": "bf16", "bf16-true": "bf16", "16-mixed": "fp16",
         "16-true": "fp16"}  # fmt: skip
_MICRO = "train_micro_batch_size_per_gpu"


class _Filled:
    """A config being completed from the Trainer: what each filled key came from, and every
    value that contradicts the Trainer (reported together as one ConfigError)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.sources: dict[str, str] = {}
        self.mismatches: list[str] = []

    def node(self, key: str) -> tuple[dict[str, Any], str]:
        *parents, leaf = key.split(".")
        cfg = self.cfg
        for p in parents:
            cfg = cfg.setdefault(p, {})
        return cfg, leaf

    def settle(self, key: str, value: Any, name: str) -> None:
        """`key` takes the Trainer's `value` (from its setting `name`) unless the config gives
        it; a given value that differs is a mismatch. "auto" (HF-style) means: fill it."""
        node, leaf = self.node(key)
        if node.get(leaf) == "auto":
            del node[leaf]
        same = (str(node.get(leaf)).lower() == str(value).lower() if key.endswith(".type")
                else node.get(leaf) == value)  # fmt: skip
        if leaf in node and not same:
            self.mismatches.append(f"`{key}` = {json.dumps(node[leaf])} in the config "
                                   f"contradicts the Trainer's {name} = {json.dumps(value)}")
        self.sources[key] = "config" if leaf in node else name
        node.setdefault(leaf, value)

    def check(self) -> None:
        if self.mismatches:
            raise ConfigError(self.mismatches)

    def summary(self, scheduler: str) -> str:
        given = sorted(k for k, v in self.sources.items() if v == "config")
        taken = sorted(f"{k} ({v})" for k, v in self.sources.items() if v != "config")
        return (f"zeroshard: from the Lightning Trainer: {', '.join(taken) or 'none'}; from "
                f"the config: {', '.join(given) or 'none'}; scheduler: {scheduler}")


def _loader_batch_size(loader: Any) -> int | None:
    """The batch size of the Trainer's train loader, read where Lightning's DeepSpeedStrategy
    reads it (`batch_sampler.batch_size`); None when it has none (several loaders, an
    iterable yielding its own batches)."""
    size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    return size if isinstance(size, int) and size > 0 else None


class ZeroShardPrecision(Precision):
    """The Trainer's precision plugin under `ZeroShardStrategy` (it wraps whichever one the
    Trainer picked). Around the forward it is the Trainer's plugin (autocast for "-mixed",
    the module and inputs cast for "-true"); the gradients are zeroshard's: the loss is
    multiplied by the optimizer's fp16 loss scale before backward (torch's GradScaler cannot
    see the sharded gradients), clipping is `optimizer.clip_grad_norm_` by the global norm,
    and the step is the optimizer's, which skips an overflowed fp16 step on every rank and
    lowers the scale. The scale is saved in the zeroshard checkpoint, not here."""

    def __init__(self, plugin: Precision) -> None:
        if type(plugin) not in (Precision, MixedPrecision, HalfPrecision) or (
                plugin.precision not in _HALF):  # fmt: skip
            raise ValueError(
                f"ZeroShardStrategy: precision={plugin.precision!r} "
                f"({type(plugin).__name__}) is not supported; use one of "
                f"{', '.join(repr(p) for p in _HALF)}"
            )
        self.plugin = plugin
        self.precision = plugin.precision

    # -- Lightning's: around the forward ------------------------------------------------------
    def convert_module(self, module: nn.Module) -> nn.Module:
        return self.plugin.convert_module(module)

    def tensor_init_context(self) -> contextlib.AbstractContextManager:
        return self.plugin.tensor_init_context()

    def module_init_context(self) -> contextlib.AbstractContextManager:
        return self.plugin.module_init_context()

    def forward_context(self) -> contextlib.AbstractContextManager:
        return self.plugin.forward_context()

    def convert_input(self, data: Any) -> Any:
        return self.plugin.convert_input(data)

    def convert_output(self, data: Any) -> Any:
        return self.plugin.convert_output(data)

    def teardown(self) -> None:
        self.plugin.teardown()

    # -- zeroshard's: the gradients -----------------------------------------------------------
    def pre_backward(self, tensor: torch.Tensor, module: Any) -> torch.Tensor:
        scale = module.trainer.optimizers[0].loss_scale  # 1.0 unless fp16
        return super().pre_backward(tensor * scale if scale != 1.0 else tensor, module)

    def clip_grad_by_norm(self, optimizer: Any, clip_val: float) -> None:
        optimizer.clip_grad_norm_(float(clip_val))

    def clip_grad_by_value(self, optimizer: Any, clip_val: float) -> None:
        raise ValueError(
            "ZeroShardStrategy: gradient_clip_algorithm='value' is not supported (gradients "
            "are sharded across ranks); use the default 'norm'"
        )


def _follow(user: torch.optim.Optimizer) -> Any:
    """A step pre-hook copying the user's optimizer's hyperparameters (moved by the
    Lightning-stepped scheduler) into zeroshard's matching param groups."""

    def hook(optimizer: Any, args: Any, kwargs: Any) -> None:
        for ours, theirs in zip(optimizer.param_groups, user.param_groups):
            for k in _GROUP_KEYS:
                if k in ours and k in theirs:
                    ours[k] = theirs[k]

    return hook


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

    # -- the precision plugin: Lightning's around the forward, zeroshard's for gradients --------
    @property
    def precision_plugin(self) -> Precision:
        return DDPStrategy.precision_plugin.fget(self)

    @precision_plugin.setter
    def precision_plugin(self, plugin: Precision | None) -> None:
        """Whatever plugin the Trainer (or the user) gives is wrapped, so a precision zeroshard
        cannot train is refused when the Trainer is built."""
        if plugin is not None and not isinstance(plugin, ZeroShardPrecision):
            plugin = ZeroShardPrecision(plugin)
        DDPStrategy.precision_plugin.fset(self, plugin)

    # -- no DDP, zeroshard's optimizer ----------------------------------------------------------
    def configure_ddp(self) -> None:
        """Nothing to wrap: zeroshard's optimizer reduces the gradients."""

    def _config_for(self, trainer: Any) -> tuple[_Filled, Any, Any, list]:
        """(config with the Trainer's settings filled in, param groups, the user's optimizer,
        its scheduler configs); a config value contradicting the Trainer is an error listing
        every mismatch."""
        filled = _Filled(copy.deepcopy(self.zeroshard_config))
        cfg, settle = filled.cfg, filled.settle
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
        settle("gradient_accumulation_steps", int(trainer.accumulate_grad_batches),
               "accumulate_grad_batches")  # fmt: skip
        if "gradient_clipping" in cfg:  # Lightning clips through the optimizer itself
            settle("gradient_clipping", float(trainer.gradient_clip_val or 0.0),
                   "gradient_clip_val")  # fmt: skip
        precision = str(trainer.precision)  # one of _HALF: ZeroShardPrecision checked it
        half, name = _HALF[precision], f"precision={precision!r}"
        if half == "fp16" or "fp16" in cfg:  # the rest of an fp16 section (loss scaling) stays
            settle("fp16.enabled", half == "fp16", name)
        if "bfloat16" not in cfg:
            settle("bf16.enabled", half == "bf16", name)
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
            if str(filled.node("optimizer.type")[0]["type"]).lower() == kind.lower():
                for k, v in defaults.items():
                    settle(f"optimizer.params.{k}", v, f"configure_optimizers() {k}")
            groups = [{k: v for k, v in g.items() if k == "params" or k in _GROUP_KEYS}
                      for g in user.param_groups]  # fmt: skip
        filled.check()
        return filled, groups, user, schedulers

    def setup_optimizers(self, trainer: Any) -> None:
        filled, groups, user, schedulers = self._config_for(trainer)
        root: nn.Module = self.lightning_module
        if int(filled.cfg.get("zero_optimization", {}).get("stage", 0)) == 3:
            root = _Stage3Root(root)
        self.model, opt = zeroshard.initialize(root, filled.cfg, model_parameters=groups)
        self.optimizers = [opt]
        self._filled = filled
        self._scheduler_names = ", ".join(type(c.scheduler).__name__ for c in schedulers) or (
            "the config's" if "scheduler" in filled.cfg else "none")  # fmt: skip
        # configure_optimizers' schedulers stay on the user's optimizer and Lightning steps
        # them as usual; before each step zeroshard's groups take their hyperparameters
        self.lr_scheduler_configs = list(schedulers)
        self._follow = None
        if schedulers and user is not None:
            self._follow = _follow(user)
            opt.register_step_pre_hook(self._follow)

    def on_train_start(self) -> None:
        """The micro-batch size comes from the train loader, which Lightning sets up after
        the optimizer exists (reading it earlier would load the data ahead of the checkpoint
        restore); it only describes the run (`train_batch_size`, estimates), so the built
        optimizer's config takes it here. Rank 0 then says where each setting came from."""
        filled, opt = self._filled, self.optimizers[0]
        size = _loader_batch_size(self.lightning_module.trainer.train_dataloader)
        if size is not None:
            filled.settle(_MICRO, size, "train_dataloader batch_size")
            world, gas = opt.config.world_size, filled.cfg["gradient_accumulation_steps"]
            given = filled.cfg.get("train_batch_size", "auto")
            if given != "auto" and isinstance(filled.cfg[_MICRO], int) and (
                    given != filled.cfg[_MICRO] * gas * world):  # fmt: skip
                filled.mismatches.append(
                    f"`train_batch_size` = {json.dumps(given)} in the config contradicts the "
                    f"Trainer's world size * train_dataloader batch_size * "
                    f"accumulate_grad_batches = {world} * {size} * {gas}"
                )
            filled.check()
            sizes = load_config({k: filled.cfg[k] for k in BATCH_AUTOS if k in filled.cfg},
                                world_size=world)  # fmt: skip
            opt.config = opt.config.model_copy(update={k: getattr(sizes, k) for k in BATCH_AUTOS})
        if self.is_global_zero:
            print(filled.summary(self._scheduler_names), file=sys.stderr, flush=True)
        super().on_train_start()

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

"""`zeroshard.initialize(model, config)`: the config-driven way in.

It reads a DeepSpeed-style JSON config (or dict), casts the model to the configured precision,
builds the sharded optimizer for the configured stage, and attaches the configured learning
rate scheduler (stepped by `optimizer.step()`, exposed as `optimizer.lr_scheduler`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError, ZeroConfig, load_config
from .optimizer import ZeroOptimizer
from .precision import LossScaler
from .schedulers import build_scheduler


def hidden_size_of(model: nn.Module) -> int | None:
    """The model's hidden size if it says so (HF `config.hidden_size`, GPT `n_embd`, ...):
    what HF-style "auto" bucket sizes are derived from."""
    for owner in (getattr(model, "config", None), model):
        for name in ("hidden_size", "n_embd", "d_model", "dim"):
            value = getattr(owner, name, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def _check_supported(cfg: ZeroConfig) -> None:
    zo = cfg.zero_optimization
    for key in ("reduce_scatter", "allgather_partitions"):
        if getattr(zo, key) is False:
            raise ConfigError(
                [
                    f"zero_optimization.{key}: false is not supported by zeroshard yet "
                    "(gradients are always reduce-scattered and partitions all-gathered); "
                    "remove the key or set it to true"
                ]
            )


def initialize(
    model: nn.Module,
    config: str | os.PathLike | Mapping[str, Any] | ZeroConfig | None = None,
    *,
    model_parameters: Iterable[torch.Tensor] | Iterable[dict[str, Any]] | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> tuple[nn.Module, Any]:
    """Returns `(model, optimizer)` set up as the config says.

    `model_parameters` (params or param-group dicts) defaults to all of `model.parameters()`;
    the config's optimizer params are the group defaults. The model is cast to bf16/fp16 when
    the config enables it (the optimizer keeps fp32 master weights). `config` defaults to the
    path in $ZEROSHARD_CONFIG, which `zeroshard run --config CFG` sets.
    """
    if config is None:
        config = os.environ.get("ZEROSHARD_CONFIG")
        if not config:
            raise ConfigError(
                "no config: pass one (zeroshard.initialize(model, 'ds_config.json')) or launch "
                "with `zeroshard run --config CFG script.py` (which sets ZEROSHARD_CONFIG)"
            )
    if not isinstance(config, ZeroConfig):
        world = dist.get_world_size(process_group) if dist.is_initialized() else 1
        config = load_config(config, world_size=world)
    cfg = config.resolve_auto(hidden_size_of(model))
    _check_supported(cfg)
    if cfg.precision != "fp32":
        model.to(cfg.compute_dtype)

    if cfg.zero_optimization.stage == 3:
        from .stage3 import initialize_stage3

        model, optimizer = initialize_stage3(model, cfg, model_parameters)
    else:
        rule, hp = cfg.optimizer_spec()
        zo = cfg.zero_optimization
        optimizer = ZeroOptimizer(
            model_parameters if model_parameters is not None else model.parameters(),
            rule,
            stage=zo.stage,
            process_group=process_group,
            reduce_bucket_size=zo.reduce_bucket_size,
            allgather_bucket_size=zo.allgather_bucket_size,
            overlap_comm=zo.overlap_comm,
            gradient_clipping=cfg.gradient_clipping,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            reduce_dtype=cfg.reduce_dtype,
            loss_scaler=LossScaler.from_fp16_config(cfg.fp16) if cfg.fp16.enabled else None,
            kernel=cfg.effective_kernel,
            **hp,
        )
    optimizer.lr_scheduler = build_scheduler(cfg.scheduler, optimizer)
    optimizer.config = cfg
    return model, optimizer

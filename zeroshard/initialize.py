"""`zeroshard.initialize(model, config)`: the config-driven way in, the same for every stage.

It reads a DeepSpeed-style JSON config (or dict) for the world of `process_group`, builds the
sharded optimizer for the configured stage (stage 3 also shards the model: stage3/build.py),
and attaches the configured learning rate scheduler (stepped by `optimizer.step()`, exposed
as `optimizer.lr_scheduler`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch.distributed as dist
from torch import nn

from . import guards, timing
from .collectives import Comm
from .config import ZeroConfig
from .optimizer import ZeroOptimizer
from .precision import LossScaler
from .prepare import (
    ParamsArg,
    group_index,
    resolve_config,
    start_process_group,
    trainable_params,
)
from .schedulers import build_scheduler
from .stage3.build import build_stage3


def initialize(
    model: nn.Module,
    config: str | os.PathLike | Mapping[str, Any] | ZeroConfig | None = None,
    *,
    model_parameters: ParamsArg = None,
    process_group: dist.ProcessGroup | None = None,
) -> tuple[nn.Module, Any]:
    """Returns `(model, optimizer)` set up as the config says.

    `model_parameters` (params or param-group dicts, any iterable) defaults to all trainable
    parameters of the model; the config's optimizer params are the group defaults. The model
    is cast to bf16/fp16 when the config enables it (the optimizer keeps fp32 master weights).
    `process_group` is the set of ranks to shard over, at every stage. `config` defaults to the
    path in $ZEROSHARD_CONFIG, which `zeroshard run --config CFG` sets. Launched by torchrun
    without a process group, it starts the default one from the launcher's environment.
    """
    guards.check_not_ddp(model)  # issue 8: zeroshard replaces DDP
    start_process_group(model, process_group)  # under torchrun, never one rank alone
    cfg = resolve_config(model, config, process_group)
    params = trainable_params(model, model_parameters)
    if cfg.zero_optimization.stage == 3:
        optimizer = build_stage3(model, cfg, params, process_group)
    else:
        if cfg.precision != "fp32":
            model.to(cfg.compute_dtype)
        # issue 8: rank 0's weights. The optimizer broadcasts the parameters it trains with
        # their flat buffer; here the rest (frozen parameters, buffers), not those twice.
        trained = group_index(params)
        guards.broadcast_module_state(Comm(process_group), model, lambda p: id(p) in trained)
        rule, hp = cfg.optimizer_spec()
        zo = cfg.zero_optimization
        optimizer = ZeroOptimizer(
            params,
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
    model.register_forward_pre_hook(guards.check_ddp_forward)  # issue 8: no DDP around it
    timing.install(model, optimizer, cfg)  # issue 8: wall_clock_breakdown
    return model, optimizer


def initialize_stage3(
    model: nn.Module,
    config: str | os.PathLike | Mapping[str, Any] | ZeroConfig,
    model_parameters: ParamsArg = None,
    *,
    process_group: dist.ProcessGroup | None = None,
) -> tuple[nn.Module, Any]:
    """`initialize` for a config that must be stage 3 (refuses any other stage)."""
    cfg = resolve_config(model, config, process_group)
    if cfg.zero_optimization.stage != 3:
        raise ValueError(
            f"initialize_stage3 needs zero_optimization.stage 3, got {cfg.zero_optimization.stage}"
        )
    return initialize(
        model, cfg, model_parameters=model_parameters, process_group=process_group
    )


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

from zeroshard import guards, timing
from zeroshard.comm.collectives import Comm
from zeroshard.config.schema import ZeroConfig
from zeroshard.optimizer import ZeroOptimizer
from zeroshard.precision import LossScaler
from zeroshard.prepare import (
    ParamsArg,
    group_index,
    placement_for,
    resolve_config,
    start_process_group,
    trainable_params,
)
from zeroshard.schedulers import build_scheduler
from zeroshard.shard import FP32, ON_DEVICE, Placement, StateCodec
from zeroshard.stage3.build import build_stage3


def initialize(
    model: nn.Module,
    config: str | os.PathLike | Mapping[str, Any] | ZeroConfig | None = None,
    *,
    model_parameters: ParamsArg = None,
    process_group: dist.ProcessGroup | None = None,
    codec: StateCodec = FP32,
    placement: Placement = ON_DEVICE,
) -> tuple[nn.Module, Any]:
    """Returns `(model, optimizer)` set up as the config says.

    `model_parameters` (params or param-group dicts, any iterable) defaults to all trainable
    parameters of the model; the config's optimizer params are the group defaults. The model
    is cast to bf16/fp16 when the config enables it (the optimizer keeps fp32 master weights).
    `process_group` is the set of ranks to shard over, at every stage. `config` defaults to the
    path in $ZEROSHARD_CONFIG, which `zeroshard run --config CFG` sets. Launched by torchrun
    without a process group, it starts the default one from the launcher's environment.
    `codec` and `placement` choose how and where every shard group keeps its state
    (`zeroshard.shard`); the config's `offload_optimizer` chooses host memory
    (`zeroshard.shard.offload`).
    """
    guards.check_not_ddp(model)  # zeroshard replaces DDP: a wrapped model is an error
    start_process_group(model, process_group)  # under torchrun, never one rank alone
    cfg = resolve_config(model, config, process_group)
    params = trainable_params(model, model_parameters)
    placement = placement_for(cfg, placement)  # offload_optimizer: master and state on the host
    if cfg.zero_optimization.stage == 3:
        optimizer = build_stage3(
            model, cfg, params, process_group, codec=codec, placement=placement
        )
    else:
        if cfg.precision != "fp32":
            model.to(cfg.compute_dtype)
        # every rank starts from rank 0's weights. The optimizer broadcasts the parameters it
        # trains with their flat buffer; here the rest (frozen parameters, buffers), once.
        trained = group_index(params)
        guards.broadcast_module_state(Comm(process_group), model, lambda p: id(p) in trained)
        rule, hp = cfg.optimizer_spec()
        zo = cfg.zero_optimization
        model.register_forward_pre_hook(guards.check_ddp_forward)  # no DDP around it
        optimizer = ZeroOptimizer(
            params,
            rule,
            stage=zo.stage,
            process_group=process_group,
            reduce_bucket_size=zo.reduce_bucket_size,
            allgather_bucket_size=zo.allgather_bucket_size,
            overlap_comm=zo.overlap_comm,
            overlap_param_gather=zo.overlap_param_gather,
            model=model,
            gradient_clipping=cfg.gradient_clipping,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            reduce_dtype=cfg.reduce_dtype,
            loss_scaler=LossScaler.from_fp16_config(cfg.fp16) if cfg.fp16.enabled else None,
            kernel=cfg.effective_kernel,
            codec=codec,
            placement=placement,
            **hp,
        )
    optimizer.lr_scheduler = build_scheduler(cfg.scheduler, optimizer)
    optimizer.config = cfg
    timing.install(model, optimizer, cfg)  # wall_clock_breakdown
    return model, optimizer

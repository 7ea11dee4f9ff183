"""What every stage's `initialize` does before building its optimizer, done once.

The config is loaded for the world of the process group it will run on (batch sizes are
derived from that world), "auto" sizes are resolved from the model's hidden size, and the
parameters to train are materialised once, so a generator passed as `model_parameters`
(as DeepSpeed allows) is read a single time and then used by every stage.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from zeroshard.config.honoured import hidden_size_of
from zeroshard.config.schema import ConfigError, ZeroConfig, load_config
from zeroshard.guards import launched_world_size
from zeroshard.shard.offload import HostOffload
from zeroshard.shard.placement import ON_DEVICE, Placement

ParamsArg = Iterable[torch.Tensor] | Iterable[dict[str, Any]] | None


def start_process_group(model: nn.Module, process_group: dist.ProcessGroup | None) -> None:
    """Launched by torchrun (WORLD_SIZE > 1) with no process group yet: start the default one
    from the launcher's environment, as `deepspeed.initialize` does (nccl for a CUDA model,
    else gloo), and say so once on rank 0. A plain single process is left alone."""
    if process_group is not None or not dist.is_available() or dist.is_initialized():
        return
    world = launched_world_size()
    if world < 2:
        return
    on_cuda = any(p.is_cuda for p in model.parameters())
    backend = "nccl" if on_cuda else "gloo"
    if on_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    if dist.get_rank() == 0:
        print(
            f"zeroshard: started the torch.distributed process group ({backend}, world size "
            f"{world}) from the launcher's environment",
            file=sys.stderr, flush=True,
        )  # fmt: skip


def check_supported(cfg: ZeroConfig) -> None:
    zo = cfg.zero_optimization
    problems = [
        f"zero_optimization.{key}: false is not supported by zeroshard yet (gradients are "
        "always reduce-scattered and partitions all-gathered); remove the key or set it to true"
        for key in ("reduce_scatter", "allgather_partitions")
        if getattr(zo, key) is False
    ]
    if problems:  # all of them at once
        raise ConfigError(problems)


def resolve_config(
    model: nn.Module,
    config: str | os.PathLike | Mapping[str, Any] | ZeroConfig | None,
    process_group: dist.ProcessGroup | None,
) -> ZeroConfig:
    """Load (for the group's world size), resolve "auto" from the model, check support.
    No config: the path in $ZEROSHARD_CONFIG (set by `zeroshard run --config CFG`)."""
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
    check_supported(cfg)
    return cfg


def trainable_params(model: nn.Module, model_parameters: ParamsArg) -> list:
    """`model_parameters` read once into a list (params or param-group dicts); default: every
    trainable parameter of the model."""
    if model_parameters is None:
        return [p for p in model.parameters() if p.requires_grad]
    if isinstance(model_parameters, torch.Tensor):
        return [model_parameters]
    return list(model_parameters)


def group_index(params: list) -> dict[int, int]:
    """id(param) -> position of its param group (0 for a plain list), first group wins: the
    parameters an optimizer built from `params` will train, and stage 3's unit order."""
    out: dict[int, int] = {}
    if params and isinstance(params[0], dict):
        for gi, g in enumerate(params):
            for p in g["params"]:
                out.setdefault(id(p), gi)
    else:
        for p in params:
            out.setdefault(id(p), 0)
    return out


def placement_for(cfg: ZeroConfig, placement: Placement) -> Placement:
    """The placement `zero_optimization.offload_optimizer` asks for, or the one passed in
    (both at once is ambiguous: an error)."""
    off = cfg.zero_optimization.offload_optimizer
    if off is None:
        return placement
    if placement is not ON_DEVICE:
        raise ValueError(
            "zero_optimization.offload_optimizer is set and a placement was passed to "
            "initialize(): give one or the other"
        )
    return HostOffload(pin_memory=off.pin_memory, threads=off.threads)

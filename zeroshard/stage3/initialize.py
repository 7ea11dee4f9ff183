"""Turning a model into a stage-3 model: units per module, the engine, the optimizer.

Units follow module ownership: every module's directly registered parameters (of one dtype)
form one unit, a parameter registered in several modules (tied weights) belongs to the first
one in `named_modules()` order and is fetched by all of them. Within a unit, parameters are
ordered by param group, so each group's part of a rank's shard is one contiguous piece.
Parameters built under `zeroshard.Init` arrive already sharded and keep their units.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import guards
from ..collectives import Comm
from ..config import ZeroConfig, load_config
from ..config_seams import stage3_bucket_numel
from ..precision import LossScaler
from .optimizer import Stage3Optimizer
from .schedule import Stage3Engine
from .state_dict import install_state_dict_hooks
from .unit import GatherTracker, ShardedUnit


def _hidden_size(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "hidden_size", None) or getattr(model, "hidden_size", None)


def _group_index(model_parameters: Any) -> dict[int, int]:
    """id(param) -> param group position (for ordering parameters inside units)."""
    out: dict[int, int] = {}
    if model_parameters is None:
        return out
    items = list(model_parameters)
    if items and isinstance(items[0], dict):
        for gi, g in enumerate(items):
            for p in g["params"]:
                out.setdefault(id(p), gi)
    else:
        for p in items:
            out.setdefault(id(p), 0)
    return out


def build_units(
    model: nn.Module,
    comm: Comm,
    *,
    dtype: torch.dtype,
    bucket_numel: int,
    persistence_threshold: int,
    tracker: GatherTracker,
    group_of: dict[int, int] | None = None,
) -> list[ShardedUnit]:
    """One unit per (owning module, dtype); parameters from `zeroshard.Init` reuse theirs."""
    group_of = group_of or {}
    units: list[ShardedUnit] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        fresh: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            unit = getattr(p, "_zs_unit", None)
            if unit is not None:
                if unit not in units:
                    units.append(unit)
                    unit.comm, unit.tracker = comm, tracker
                    if unit.num_shards != comm.world_size or unit.rank != comm.rank:
                        raise ValueError(
                            f"rank {comm.rank}: parameter {name!r} was partitioned by "
                            f"zeroshard.Init over {unit.num_shards} ranks, but this process "
                            f"group has {comm.world_size}"
                        )
                continue
            with torch.no_grad():
                if p.is_floating_point() and p.dtype != dtype:
                    p.data = p.data.to(dtype)
            fresh.setdefault(p.dtype, []).append(p)
        for params in fresh.values():
            params.sort(key=lambda q: group_of.get(id(q), len(group_of) + 1))
            numel = sum(q.numel() for q in params)
            units.append(
                ShardedUnit(
                    params, comm, bucket_numel, name=name or "<root>", tracker=tracker,
                    persistent=numel < persistence_threshold,
                )
            )  # fmt: skip
    return units


def initialize_stage3(
    model: nn.Module,
    cfg: ZeroConfig | dict | str,
    model_parameters: Any = None,
    *,
    process_group: dist.ProcessGroup | None = None,
) -> tuple[nn.Module, Stage3Optimizer]:
    """Shard `model` for ZeRO stage 3 and build its optimizer; returns (the same model, opt).

    `model_parameters`: parameters or param-group dicts (default: every trainable parameter
    of the model, one group). Hyperparameters come from the config's optimizer section.
    """
    if not isinstance(cfg, ZeroConfig):
        cfg = load_config(cfg)
    cfg = cfg.resolve_auto(_hidden_size(model))
    zo = cfg.zero_optimization
    if zo.stage != 3:
        raise ValueError(f"initialize_stage3 needs zero_optimization.stage 3, got {zo.stage}")
    if getattr(model, "_zs_engine", None) is not None:
        raise ValueError("this model is already a stage-3 model (initialize it once)")
    comm = Comm(process_group)
    guards.check_params(model.parameters())  # issue 8: no meta-device model
    guards.broadcast_module_state(comm, model)  # issue 8: rank 0's weights, before sharding
    tracker = GatherTracker()
    dtype = cfg.compute_dtype
    with torch.no_grad():
        for b in model.buffers():
            if b.is_floating_point() and b.dtype != dtype:
                b.data = b.data.to(dtype)
    units = build_units(
        model, comm, dtype=dtype, bucket_numel=stage3_bucket_numel(zo),  # issue 8: + reduce
        persistence_threshold=int(zo.stage3_param_persistence_threshold), tracker=tracker,
        group_of=_group_index(model_parameters),
    )  # fmt: skip
    engine = Stage3Engine(
        model, units, comm, cfg.reduce_dtype,
        prefetch_numel=int(zo.stage3_prefetch_bucket_size),
        max_live_numel=int(zo.stage3_max_live_parameters),
        max_reuse_numel=int(zo.stage3_max_reuse_distance), tracker=tracker,
    )  # fmt: skip
    rule, hp = cfg.optimizer_spec()
    params = model_parameters
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    scaler = LossScaler.from_fp16_config(cfg.fp16) if cfg.precision == "fp16" else None
    opt = Stage3Optimizer(
        engine, params, rule, process_group=process_group,
        gradient_clipping=cfg.gradient_clipping,
        gradient_accumulation_steps=int(cfg.gradient_accumulation_steps or 1),
        reduce_dtype=cfg.reduce_dtype, loss_scaler=scaler, kernel=cfg.effective_kernel, **hp,
    )  # fmt: skip
    model._zs_engine = engine  # type: ignore[assignment]
    install_state_dict_hooks(model, engine, rank0_only=False)
    return model, opt

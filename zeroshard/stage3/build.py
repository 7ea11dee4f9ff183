"""Turning a model into a stage-3 model: units per module, the engine, the optimizer.

Units follow module ownership (grouping.py): with "module" grouping every module's directly
registered parameters (of one dtype) form one unit; with "block" grouping (the default) or
named classes, a block's whole subtree is one unit. A parameter registered in several
modules (tied weights) belongs to the first one in `named_modules()` order and is fetched by
all of them. Within a unit, parameters are
ordered by param group, so each group's part of a rank's shard is one contiguous piece.
Parameters built under `zeroshard.Init` arrive already sharded and keep their units.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from zeroshard import guards
from zeroshard.comm.collectives import Comm
from zeroshard.comm.topology import NodeTopology
from zeroshard.config.honoured import stage3_bucket_numel
from zeroshard.config.schema import ZeroConfig
from zeroshard.config.zeropp import ZeroPPConfig, check_zeropp_topology
from zeroshard.optimizer import ZeroOptimizer
from zeroshard.precision import LossScaler
from zeroshard.prepare import group_index
from zeroshard.quant8.codec import codec_for
from zeroshard.shard import FP32, ON_DEVICE, Placement, StateCodec
from zeroshard.shard.codec import alignment_of
from zeroshard.stage3 import registry
from zeroshard.stage3.engine import Stage3Engine
from zeroshard.stage3.grouping import Grouping, unit_owner, unit_roots
from zeroshard.stage3.sharding import UnitSharding
from zeroshard.stage3.state_dict import install_state_dict_hooks
from zeroshard.stage3.unit import GatherTracker, ShardedUnit
from zeroshard.stage3.zeropp import ZeroPP, build_zeropp


def build_units(
    model: nn.Module,
    comm: Comm,
    *,
    dtype: torch.dtype,
    bucket_numel: int,
    persistence_threshold: int,
    tracker: GatherTracker,
    group_of: dict[int, int] | None = None,
    align: Callable[[int], int] | None = None,
    grouping: Grouping = "module",
) -> list[ShardedUnit]:
    """One unit per (owning module or block, dtype); parameters from `zeroshard.Init` reuse
    theirs. `align`: the state codec's alignment, honoured by fresh units' layouts."""
    group_of = group_of or {}
    units: list[ShardedUnit] = []
    seen: set[int] = set()
    roots = unit_roots(model, grouping)
    owner = unit_owner(model, roots)
    fresh_of: dict[nn.Module, dict[torch.dtype, list[nn.Parameter]]] = {}
    names: dict[nn.Module, str] = {}
    for name, module in model.named_modules():
        names[module] = name
        fresh = fresh_of.setdefault(owner[module], {})
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            unit = registry.unit_of(p)
            if unit is not None:
                if unit not in units:
                    units.append(unit)
                    unit.adopt(comm, tracker)
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
    for module, fresh in fresh_of.items():
        for params in fresh.values():
            params.sort(key=lambda q: group_of.get(id(q), len(group_of) + 1))
            numel = sum(q.numel() for q in params)
            units.append(
                ShardedUnit(
                    params, comm, bucket_numel, name=names[module] or "<root>",
                    tracker=tracker, persistent=numel < persistence_threshold, align=align,
                )
            )  # fmt: skip
    return units


def make_units(
    model: nn.Module, comm: Comm, cfg: ZeroConfig, tracker: GatherTracker,
    group_of: dict[int, int] | None, codec: StateCodec = FP32,
) -> list[ShardedUnit]:
    """The units with the config's bucket and persistence sizes, laid out as `codec` needs
    (training and the estimator's meta-device run build them the same way)."""
    zo = cfg.zero_optimization
    return build_units(
        model, comm, dtype=cfg.compute_dtype, bucket_numel=stage3_bucket_numel(zo),
        persistence_threshold=int(zo.stage3_param_persistence_threshold), tracker=tracker,
        group_of=group_of, align=alignment_of(codec), grouping=zo.stage3_unit_grouping,
    )  # fmt: skip


def make_engine(
    model: nn.Module, units: list[ShardedUnit], comm: Comm, cfg: ZeroConfig,
    tracker: GatherTracker, zeropp: ZeroPP | None = None,
) -> Stage3Engine:
    """The engine with the config's prefetch, live and reuse limits (training and the
    estimator's meta-device run build it the same way); `zeropp`: ZeRO++'s collectives."""
    zo = cfg.zero_optimization
    return Stage3Engine(
        model, units, comm, cfg.reduce_dtype,
        prefetch_numel=int(zo.stage3_prefetch_bucket_size),
        max_live_numel=int(zo.stage3_max_live_parameters),
        max_reuse_numel=int(zo.stage3_max_reuse_distance), tracker=tracker,
        reduce_numel=stage3_bucket_numel(zo), zeropp=zeropp,
    )  # fmt: skip


def make_zeropp(comm: Comm, cfg: ZeroConfig) -> ZeroPP | None:
    """The config's ZeRO++ collectives over `comm` (None: off). The topology is checked on
    every rank, with check-config's rule, before any subgroup is created."""
    zo = cfg.zero_optimization
    zpp = ZeroPPConfig.of(zo)
    if not zpp.enabled:
        return None
    world = dist.get_world_size() if comm.initialized else 1
    try:
        check_zeropp_topology(zo, world, NodeTopology.from_env(world).local_world_size)
    except ValueError as e:
        raise ValueError(f"rank {comm.rank}: {e}") from None
    return build_zeropp(comm, zpp)


def build_stage3(
    model: nn.Module,
    cfg: ZeroConfig,
    params: list,
    process_group: dist.ProcessGroup | None = None,
    *,
    codec: StateCodec = FP32,
    placement: Placement = ON_DEVICE,
) -> ZeroOptimizer:
    """Shard `model` over `process_group` for ZeRO stage 3 and build its optimizer.

    `params`: parameters or param-group dicts (a list: `zeroshard.initialize` materialises
    whatever iterable the user gave). Hyperparameters come from the config's optimizer section.
    """
    if registry.engine_of(model) is not None:
        raise ValueError("this model is already a stage-3 model (initialize it once)")
    comm = Comm(process_group)
    guards.check_params(model.parameters())  # a meta-device model has no values to shard
    # every rank starts from rank 0's weights
    guards.broadcast_module_state(comm, model, registry.unit_of)
    tracker = GatherTracker()
    dtype = cfg.compute_dtype
    with torch.no_grad():
        for b in model.buffers():
            if b.is_floating_point() and b.dtype != dtype:
                b.data = b.data.to(dtype)
    rule, hp = cfg.optimizer_spec()
    codec, hp = codec_for(rule, hp, codec)  # the units are laid out as the codec needs
    units = make_units(model, comm, cfg, tracker, group_index(params), codec)
    off = cfg.zero_optimization.offload_param
    if off is not None:  # before the optimizer takes views of the shards
        for u in units:
            u.offload_shard(off.pin_memory)
    engine = make_engine(model, units, comm, cfg, tracker, make_zeropp(comm, cfg))
    scaler = LossScaler.from_fp16_config(cfg.fp16) if cfg.precision == "fp16" else None
    opt = ZeroOptimizer(
        params, rule, sharding=UnitSharding(engine), codec=codec, placement=placement,
        gradient_clipping=cfg.gradient_clipping,
        gradient_accumulation_steps=int(cfg.gradient_accumulation_steps or 1),
        reduce_dtype=cfg.reduce_dtype, loss_scaler=scaler, kernel=cfg.effective_kernel, **hp,
    )  # fmt: skip
    registry.set_engine(model, engine)
    install_state_dict_hooks(model, engine, rank0_only=False)
    return opt

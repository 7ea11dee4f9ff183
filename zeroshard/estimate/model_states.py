"""Bytes per rank and bytes sent per step for ZeRO stages 0-3, before any process starts.

The numbers come from zeroshard's own layout planner run on the meta device (no memory is
allocated): `FlatParams` for stages 0-2 and `build_units`/`ShardedUnit` for stage 3, so bucket
padding (each bucket rounds up to world_size * ALIGN elements), tied parameters (counted once),
frozen parameters (no gradient, no optimizer state) and one flat buffer per (param group, dtype)
are exactly what the optimizer will hold. `tests/test_estimate.py` compares them with
`memory_report()` after a real step.

Model states are exact. Stage 3's gathered peak and bytes sent depend on the call order, so
they come from running the stage-3 engine itself on the meta device over an `example_input`
(estimate/stage3.py): modules called several times per forward, tied weights used through
`F.linear`, prefetch and reuse are all what the engine does. Without an example input the
engine runs on one synthesized from the model's first layer; when none fits (or the forward
fails on meta) on every module called once in registration order, which runs low for reused
modules; `StageEstimate.schedule` says which one was used.
`comm_bytes` counts ring-algorithm bytes a rank sends in one step after the first.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from zeroshard.comm.meta import MetaComm
from zeroshard.comm.topology import inter_fraction
from zeroshard.config.honoured import hidden_size_of
from zeroshard.config.schema import ConfigError, ZeroConfig, load_config
from zeroshard.config.zeropp import HPZ_KEY, ZEROPP_BOOL_KEYS
from zeroshard.estimate.offload import with_offload
from zeroshard.estimate.stage3 import stage3, state_codec
from zeroshard.shard.codec import FP32, StateCodec
from zeroshard.shard.flat import FlatSharding
from zeroshard.shard.placement import ON_DEVICE
from zeroshard.timing import progress

CATEGORIES = ("params", "grads", "master", "optimizer_states", "comm_buffers")
_OPTIMIZER_SECTIONS = {
    "adamw": {"type": "AdamW", "params": {}},
    "adam": {"type": "Adam", "params": {"adam_w_mode": False}},
    "sgd": {"type": "SGD", "params": {"momentum": 0.9}},
    "lion": {"type": "Lion", "params": {}},
    "adamw8bit": {"type": "AdamW8bit", "params": {}},
}


@dataclass
class StageEstimate:
    """One stage's bytes on the worst rank (model states between steps), its stage-3
    gathered peak, and bytes it sends per step."""

    stage: int
    # CATEGORIES + "total" (model states + comm buffers between steps), and how much of the
    # total is "device" and "host" memory (offload), as `memory_report()` reports them
    bytes: dict[str, int]
    gathered_peak: int | None  # stage 3: full parameters alive at the peak (forward/backward)
    peak_total: int  # device bytes + gathered_peak (+ hpz_secondary): what the device holds
    comm_bytes: int  # bytes this rank sends per step
    per_rank: list[dict[str, int]] = field(default_factory=list)
    fits: bool | None = None
    # stage 3: "traced" (the engine ran on the example input), "synthesized input: ..." or
    # "registration order: <why>"
    schedule: str | None = None
    # of comm_bytes, what goes to ranks on other nodes (comm/topology.py; None: not known)
    comm_inter_node: int | None = None
    hpz_secondary: int = 0  # stage 3 with hpZ: secondary shards held from forward to update


def zero_config(
    config: str | Mapping[str, Any] | None,
    *,
    stage: int,
    world_size: int,
    precision: str | None = None,
    optimizer: str | None = None,
) -> ZeroConfig:
    """The config as `zeroshard.initialize` would see it, with stage (and optionally
    precision and optimizer) overridden. Batch sizes are dropped: they size activations,
    which this does not estimate, and a config written for another world size may fix them."""
    source = None
    if isinstance(config, (str, bytes)) or hasattr(config, "__fspath__"):
        source = os.fspath(config)  # type: ignore[arg-type]
        try:
            with open(source, encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, ValueError):
            load_config(source)  # raises its own error text (missing file, bad JSON, ...)
            raise
    else:
        raw = copy.deepcopy(dict(config or {}))
    if not isinstance(raw, dict):
        raise ConfigError("the top level must be a JSON object", source=source)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu",
                "gradient_accumulation_steps"):  # fmt: skip
        raw.pop(key, None)
    zo = raw["zero_optimization"] = {**raw.get("zero_optimization", {}), "stage": stage}
    # an offload the stage does not have (stage 0: nothing sharded; params below 3) is left out
    if stage == 0:
        zo.pop("offload_optimizer", None)
    if stage < 3:  # so are stage 3's own options: offloaded parameters, ZeRO++
        zo.pop("offload_param", None)
        for key in (*ZEROPP_BOOL_KEYS, HPZ_KEY):
            zo.pop(key, None)
    if precision is not None:
        raw.pop("bfloat16", None)
        for name in ("bf16", "fp16"):
            raw[name] = {**raw.get(name, {}), "enabled": precision == name}
    if optimizer is not None:
        raw["optimizer"] = copy.deepcopy(_OPTIMIZER_SECTIONS[optimizer])
    try:
        return load_config(raw, world_size=world_size)
    except ConfigError as e:
        raise ConfigError(e.problems, source=source) from None


def _groups(model: nn.Module, model_parameters: Any) -> list[list[nn.Parameter]]:
    """Parameters per param group, as `initialize(model, cfg, model_parameters=...)` takes
    them (default: one group of every parameter; a tied parameter is listed once)."""
    if model_parameters is None:
        return [list(model.parameters())]
    items = list(model_parameters)
    if items and isinstance(items[0], Mapping):
        return [list(g["params"]) for g in items]
    return [items]


def _group_of(model: nn.Module, model_parameters: Any) -> dict[int, int]:
    """id(param) -> its group, first group wins (stage 3 orders a unit's params by group)."""
    out: dict[int, int] = {}
    if model_parameters is not None:
        for gi, params in enumerate(_groups(model, model_parameters)):
            for p in params:
                out.setdefault(id(p), gi)
    return out


def _stage012(
    groups: list[list[nn.Parameter]], cfg: ZeroConfig, world: int, codec: StateCodec,
    local: int | None = None,
) -> tuple[dict[str, int], int, int]:
    """Bytes and bytes sent per step at stages 0-2, read from the shard groups the optimizer
    itself builds (`FlatSharding` over a `MetaComm`): buckets, padding, gradient buffers and
    the codec's stored state are what a real run holds."""
    zo = cfg.zero_optimization
    comm = MetaComm(world, 0, inter_fraction=inter_fraction(world, local, 0))
    sharding = FlatSharding(
        comm, zo.stage, reduce_dtype=cfg.reduce_dtype, overlap_comm=zo.overlap_comm,
        accumulation_steps=int(cfg.gradient_accumulation_steps or 1),
        bucket_numel=zo.reduce_bucket_size, allgather_bucket_size=zo.allgather_bucket_size,
    )  # fmt: skip
    rule, hp = cfg.optimizer_spec()
    codec = state_codec(cfg) or codec  # a rule that stores its state per piece (AdamW8bit)
    built = []
    seen: set[int] = set()
    for gi, params in enumerate(groups):
        trainable = [p for p in params if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in trainable)
        for g in sharding.build_groups(gi, trainable, codec, ON_DEVICE):
            g.init_state(rule, hp, None, {})
            built.append(g)
    sharding.grads.remove()
    held = sharding.held_tensors()
    out = dict.fromkeys(CATEGORIES, 0)
    out["params"] = sum(_nbytes(t) for t in held["params"])
    out["grads"] = sum(_nbytes(t) for t in held["grads"])
    out["master"] = sum(_nbytes(g.master_buffer) for g in built if g.master_buffer is not None)
    out["optimizer_states"] = sum(_nbytes(t) for g in built for t in g.stored_tensors())
    piece_bytes = getattr(codec, "piece_bytes", None)
    if piece_bytes is not None:  # per-piece state differs between ranks: the worst one
        per_rank = [0] * max(1, sharding.flats[0].num_shards if sharding.flats else 1)
        for g in built:
            for h in g.held_params():
                for q in h.pieces:
                    per_rank[q.rank] += piece_bytes(math.prod(h.shape), q.numel)
        out["optimizer_states"] = max(per_rank)
    master_numel = sum(m.numel() for g in built for m in g.master)
    # per step: stage 0 all-reduces every gradient buffer; stages 1-2 reduce-scatter it and
    # all-gather the updated parameters, plus the global grad-norm / inf check all-reduce
    comm.counter.snapshot()
    for flat, grad in zip(sharding.flats, _full_grads(sharding, held["grads"])):
        if zo.stage == 0:
            comm.all_reduce(grad)
        else:
            comm.reduce_scatter(grad, grad)
            comm.all_gather(flat.flat, flat.flat)
    if zo.stage > 0:
        comm.all_reduce(torch.empty(2, dtype=torch.float64, device="meta"))
    sent = comm.counter.snapshot()
    return with_offload(out, cfg, master_numel, 0), sent["total"], sent["inter_node"]


def _full_grads(sharding: FlatSharding, grads: list[Tensor]) -> list[Tensor]:
    """The full gradient each flat buffer reduces (stage 2 keeps only its shard)."""
    pairs = zip(sharding.flats, grads)
    return [g if g.numel() == f.numel else g.new_empty(f.numel) for f, g in pairs]


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class Numel(nn.Module):
    """A model known only by its parameter count (`--params`): one meta parameter."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(int(numel), device="meta"))


def _sample_ranks(world: int) -> list[int]:
    """Ranks to plan stage 3 for: all of them, or the first and last 8 (padding sits in the
    last chunks of each bucket, so the extremes bound the rest)."""
    return list(range(world)) if world <= 16 else list(range(8)) + list(range(world - 8, world))


def estimate(
    model: nn.Module,
    *,
    world_size: int,
    config: str | Mapping[str, Any] | None = None,
    precision: str | None = None,
    optimizer: str | None = None,
    stages: tuple[int, ...] = (0, 1, 2, 3),
    device_memory: int | None = None,
    model_parameters: Any = None,
    example_input: Any = None,
    codec: StateCodec = FP32,
    local_world_size: int | None = None,
) -> list[StageEstimate]:
    """Per stage: bytes per rank by category, stage-3 gathered peak, bytes sent per step.

    `model` should live on the meta device (it is cast to the configured precision and its
    parameters are re-pointed by the planner; build one just for this). `precision` and
    `optimizer` override the config's; the config's bucket, prefetch and persistence sizes
    are used ("auto" sizes resolve from the model's hidden size, as in initialize).
    `model_parameters`: params or param-group dicts, as `initialize` takes them.
    `example_input`: what the model's forward takes (a tensor, a tuple of positional
    arguments or a dict of keyword arguments; moved to the model's device, floating tensors
    cast to the compute dtype). With it, stage 3's gathered peak and bytes sent come from the
    engine run on it; without it, on an input synthesized from the first layer, else on
    registration order (`schedule` says which).
    `codec`: how optimizer state is stored (its `stored_bytes` counts the state bytes).
    `local_world_size`: ranks per node (default: all on one node); splits the bytes sent into
    intra- and inter-node (`comm_inter_node`), and places ZeRO++'s hpZ and qgZ groups.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    structured = not isinstance(model, Numel)
    out = []
    for stage in progress(stages, f"estimating {world_size} ranks", unit="stage"):
        cfg = zero_config(config, stage=stage, world_size=world_size, precision=precision,
                          optimizer=optimizer)  # fmt: skip
        cfg = cfg.resolve_auto(hidden_size_of(model))
        model.to(cfg.compute_dtype)
        schedule = None
        if stage < 3:
            report, comm, inter = _stage012(_groups(model, model_parameters), cfg, world_size,
                                            codec, local_world_size)  # fmt: skip
            per_rank, peak, secondary = [report], None, 0
        else:
            s3 = stage3(model, cfg, world_size, _sample_ranks(world_size), structured=structured,
                        group_of=_group_of(model, model_parameters),
                        example_input=example_input, codec=codec,
                        local=local_world_size)  # fmt: skip
            per_rank, comm, schedule = s3.per_rank, s3.comm, s3.schedule
            inter, secondary = s3.comm_inter, s3.hpz_secondary
            peak = s3.peak if structured else None
        for r in per_rank:
            host = r.pop("host")
            r["total"] = sum(r[c] for c in CATEGORIES)
            r["device"], r["host"] = r["total"] - host, host
        worst = max(per_rank, key=lambda r: r["total"])
        total = worst["device"] + (peak or 0) + secondary
        fits = None if device_memory is None else total <= device_memory
        out.append(StageEstimate(stage, dict(worst), peak, total, comm, per_rank, fits, schedule,
                                 comm_inter_node=inter, hpz_secondary=secondary))  # fmt: skip
    return out


def as_dict(estimates: list[StageEstimate]) -> list[dict[str, Any]]:
    return [asdict(e) for e in estimates]

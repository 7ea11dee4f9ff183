"""Bytes per rank and bytes sent per step for ZeRO stages 0-3, before any process starts.

The numbers come from zeroshard's own layout planner run on the meta device (no memory is
allocated): `FlatParams` for stages 0-2 and `build_units`/`ShardedUnit` for stage 3, so bucket
padding (each bucket rounds up to world_size * ALIGN elements), tied parameters (counted once),
frozen parameters (no gradient, no optimizer state) and one flat buffer per (param group, dtype)
are exactly what the optimizer will hold. `tests/test_estimate.py` compares them with
`memory_report()` after a real step.

Model states are exact. Two numbers are models of the runtime schedule, not of the layout:
- `gathered_peak` (stage 3): the largest set of full parameters alive at once, replaying the
  engine's rules on the module order (units in use by a module and its ancestors, prefetch up
  to `stage3_prefetch_bucket_size` elements, reuse retention, tied units pinned through
  backward); it assumes each module runs once per forward, in registration order, using its
  own parameters, as transformer stacks do. Where that fails it runs LOW: a block applied 3
  times per forward (tests/models_stage3.py ReusedBlock) peaks 1.9x the estimate, an
  embedding reused by the root through `F.linear` (TiedFLinear) 1.34x;
- `comm_bytes`: ring-algorithm bytes a rank sends in one step after the first (stage 3:
  from the same replay, so a module reused within a forward sends more than estimated).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from . import update
from .config import ConfigError, ZeroConfig, load_config
from .flat_buffer import FlatParams
from .prepare import hidden_size_of
from .stage3 import registry
from .stage3.build import build_units
from .stage3.unit import GatherTracker

CATEGORIES = ("params", "grads", "master", "optimizer_states", "comm_buffers")
_ELEM = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
_OPTIMIZER_SECTIONS = {
    "adamw": {"type": "AdamW", "params": {}},
    "adam": {"type": "Adam", "params": {"adam_w_mode": False}},
    "sgd": {"type": "SGD", "params": {"momentum": 0.9}},
    "lion": {"type": "Lion", "params": {}},
}


@dataclass
class StageEstimate:
    """One stage's bytes on the worst rank (model states between steps), its stage-3
    gathered peak, and bytes it sends per step."""

    stage: int
    bytes: dict[str, int]  # CATEGORIES + "total" (model states + comm buffers between steps)
    gathered_peak: int | None  # stage 3: full parameters alive at the peak (forward/backward)
    peak_total: int  # total + gathered_peak
    comm_bytes: int  # bytes this rank sends per step
    per_rank: list[dict[str, int]] = field(default_factory=list)
    fits: bool | None = None


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
    raw["zero_optimization"] = {**raw.get("zero_optimization", {}), "stage": stage}
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


def _entries(groups: list[list[nn.Parameter]]) -> list[list[nn.Parameter]]:
    """Trainable parameters per (param group, dtype): one flat buffer each, as the optimizer
    builds them."""
    out = []
    for params in groups:
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in params:
            if p.requires_grad:
                by_dtype.setdefault(p.dtype, []).append(p)
        out += list(by_dtype.values())
    return out


def _state_tensors(cfg: ZeroConfig) -> int:
    """fp32 state tensors per master element for the configured rule."""
    rule, hp = cfg.optimizer_spec()
    return len(update.init_state(rule, hp, [torch.empty(1, device="meta")]))


def _ring(world: int) -> float:
    return (world - 1) / world


def _stage012(
    groups: list[list[nn.Parameter]], cfg: ZeroConfig, world: int
) -> tuple[dict[str, int], int]:
    zo = cfg.zero_optimization
    stage = zo.stage
    elem = _ELEM[cfg.compute_dtype]
    red = _ELEM[cfg.reduce_dtype]
    shards = 1 if stage == 0 else world
    states = _state_tensors(cfg)
    out = dict.fromkeys(CATEGORIES, 0)
    comm = 0.0
    for params in _entries(groups):
        flat = FlatParams(params, shards, 0, int(zo.reduce_bucket_size))
        out["params"] += flat.numel * elem
        out["grads"] += (flat.shard_numel if stage == 2 else flat.numel) * red
        out["master"] += 0 if elem == 4 else flat.shard_numel * 4
        out["optimizer_states"] += states * flat.shard_numel * 4
        if world > 1:
            if stage == 0:
                comm += 2 * flat.numel * red * _ring(world)
            else:  # reduce-scatter of the gradients, all-gather of the updated parameters
                comm += flat.numel * (red + elem) * _ring(world)
    if world > 1 and stage > 0:
        comm += 2 * 16 * _ring(world)  # the global grad-norm / inf check all-reduce
    return out, int(round(comm))


def _unit_pieces(u: Any) -> int:
    """Elements of this rank's shard of `u` that belong to trainable parameters (what the
    stage-3 optimizer keeps fp32 master and state for; padding excluded)."""
    total = 0
    for s in u.slots:
        if s.param.requires_grad:
            total += sum(z - a for _, a, z in u.chunk_overlaps(s.offset, s.offset + s.numel))
    return total


def _stage3_units(
    model: nn.Module, cfg: ZeroConfig, world: int, rank: int, group_of: dict[int, int]
) -> list[Any]:
    zo = cfg.zero_optimization
    return build_units(
        model, SimpleNamespace(world_size=world, rank=rank), dtype=cfg.compute_dtype,  # type: ignore[arg-type]
        bucket_numel=int(zo.allgather_bucket_size),
        persistence_threshold=int(zo.stage3_param_persistence_threshold),
        tracker=GatherTracker(), group_of=group_of,
    )  # fmt: skip


def _forget_units(model: nn.Module, shapes: dict[int, tuple[torch.Size, torch.dtype]]) -> None:
    """Undo what building units did to the meta model (placeholders, the unit registry)."""
    for p in model.parameters():
        registry.clear_unit(p)
        shape, dtype = shapes[id(p)]
        p.data = torch.empty(shape, dtype=dtype, device="meta")


def _stage3(
    model: nn.Module, cfg: ZeroConfig, world: int, ranks: list[int], structured: bool = True,
    group_of: dict[int, int] | None = None,
) -> tuple[list[dict[str, int]], int, int]:
    """Per-rank bytes, gathered peak, bytes sent. Without layers (`Numel`) the schedule
    cannot be replayed: every parameter is taken as gathered once in forward and once in
    backward, the paper's 3Ψ per step."""
    elem = _ELEM[cfg.compute_dtype]
    red = _ELEM[cfg.reduce_dtype]
    states = _state_tensors(cfg)
    shapes = {id(p): (p.shape, p.dtype) for p in model.parameters()}
    per_rank = []
    units: list[Any] = []
    for rank in ranks:
        units = _stage3_units(model, cfg, world, rank, group_of)
        pieces = sum(_unit_pieces(u) for u in units if u.trainable)
        per_rank.append({
            "params": sum(u.full_bytes if u.persistent else u.shard_numel * elem for u in units),
            "grads": sum(u.shard_numel * red for u in units if u.trainable),
            "master": 0 if elem == 4 else pieces * 4,
            "optimizer_states": states * pieces * 4,
            "comm_buffers": 0,
        })  # fmt: skip
        if rank != ranks[-1]:
            _forget_units(model, shapes)
    peak, gathers = _replay(model, units, cfg)
    if not structured:
        gathers = 2 * sum(u.numel for u in units if not u.persistent)
    comm = 0.0
    if world > 1:
        comm += gathers * elem * _ring(world)
        comm += sum(u.numel for u in units if u.trainable and not u.persistent) * red * _ring(world)
        comm += sum(u.numel for u in units if u.trainable and u.persistent) * (red + elem) * _ring(
            world
        )
        comm += 2 * 16 * _ring(world)
    _forget_units(model, shapes)
    return per_rank, peak * elem, int(round(comm))


def _replay(model: nn.Module, units: list[Any], cfg: ZeroConfig) -> tuple[int, int]:
    """(peak gathered elements, elements all-gathered per step) of the stage-3 schedule,
    replayed on the module tree: forward in registration order, backward in reverse."""
    zo = cfg.zero_optimization
    prefetch = int(zo.stage3_prefetch_bucket_size)
    limits = (prefetch, int(zo.stage3_max_live_parameters))
    owner = {id(p): u for u in units for p in u.params}
    # (enter?, the module's non-persistent units, its persistent ones)
    events: list[tuple[bool, list[Any], list[Any]]] = []

    def walk(m: nn.Module) -> None:
        # A module with parameters of its own fetches its children's with them: such a parent
        # computes with them itself (nn.MultiheadAttention never calls its out_proj), and the
        # engine learns them as its external units, gathered in one loop.
        folded = any(True for _ in m.parameters(recurse=False)) and m is not model
        own: list[Any] = []
        for p in m.parameters(recurse=folded):
            u = owner.get(id(p))
            if u is not None and u not in own:
                own.append(u)
        sharded = [u for u in own if not u.persistent]
        whole = [u for u in own if u.persistent]
        events.append((True, sharded, whole))
        for child in () if folded else m.children():
            walk(child)
        events.append((False, sharded, whole))

    walk(model)
    back = [(not enter, own, whole) for enter, own, whole in reversed(events)]
    back_seq = [u for enter, own, _ in back if enter for u in own]
    head = _head(back_seq, prefetch)
    peak_f, gathers_f = _pass(events, limits, int(zo.stage3_max_reuse_distance), set(), head)
    peak_b, gathers_b = _pass(back, limits, 0, {id(u) for u in head}, [], pin=True)
    return max(peak_f, peak_b), gathers_f + gathers_b


def _head(seq: list[Any], prefetch: int) -> list[Any]:
    """The units backward starts with, kept gathered at the end of forward (the first one
    whatever its size, then more up to one prefetch bucket)."""
    keep: list[Any] = []
    budget = 0
    for u in seq:
        if u in keep:
            continue
        if keep and budget + u.numel > prefetch:
            break
        keep.append(u)
        budget += u.numel
    return keep


def _pass(
    events: list[tuple[bool, list[Any], list[Any]]], limits: tuple[int, int], reuse: int,
    start: set[int], head: list[Any], pin: bool = False,
) -> tuple[int, int]:
    """One pass of module enter/exit events: (peak elements gathered, elements gathered).
    `pin` (backward): a unit stays gathered until its last use of the pass, when all of its
    gradients are in (a tied embedding: from the head's backward to the embedding's).

    As in the engine, persistent units not in use count against the prefetch budget."""
    prefetch, max_live = limits
    seq = [u for enter, own, _ in events if enter for u in own]
    size = {id(u): u.numel for u in seq}
    whole = {id(u): u.numel for _, _, w in events for u in w}
    whole_users: dict[int, int] = {}
    gathered: set[int] = set(start)
    users: dict[int, int] = {}
    retained: set[int] = set()
    peak = gathers = pos = 0

    def gather(i: int) -> None:
        nonlocal gathers
        if i not in gathered:
            gathered.add(i)
            gathers += size[i]

    for enter, own, persistent in events:
        if not pin:  # forward: a running module's persistent units are in use
            for u in persistent:
                whole_users[id(u)] = whole_users.get(id(u), 0) + (1 if enter else -1)
        if enter:
            for u in own:
                pos += 1
                retained.discard(id(u))
                pending = sum(size[i] for i in gathered
                              if not users.get(i) and i not in retained)
                pending += sum(n for i, n in whole.items() if not whole_users.get(i))
                live = sum(size[i] for i in gathered)
                for nxt in seq[pos:]:
                    i = id(nxt)
                    if i in gathered:
                        continue
                    if pending + size[i] > prefetch or live + size[i] > max_live:
                        break
                    gather(i)
                    pending += size[i]
                    live += size[i]
                gather(id(u))
            for u in own:
                users[id(u)] = users.get(id(u), 0) + 1
            peak = max(peak, sum(size[i] for i in gathered))
        else:
            for u in own:
                users[id(u)] -= 1
                if users[id(u)] == 0:
                    rest = seq[pos:]
                    if (pin and u in rest) or _reused_within(u, rest, reuse) or (
                        u not in rest and u in head
                    ):
                        retained.add(id(u))
                    else:
                        gathered.discard(id(u))
    for u in head:  # gathered at the end of forward, to overlap the loss
        gather(id(u))
    peak = max(peak, sum(size[i] for i in gathered))
    return peak, gathers


def _reused_within(u: Any, rest: list[Any], reuse: int) -> bool:
    seen: set[int] = set()
    numel = 0
    for x in rest:
        if x is u:
            return numel <= reuse
        if id(x) not in seen:
            seen.add(id(x))
            numel += x.numel
    return False


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
) -> list[StageEstimate]:
    """Per stage: bytes per rank by category, stage-3 gathered peak, bytes sent per step.

    `model` should live on the meta device (it is cast to the configured precision and its
    parameters are re-pointed by the planner; build one just for this). `precision` and
    `optimizer` override the config's; the config's bucket, prefetch and persistence sizes
    are used ("auto" sizes resolve from the model's hidden size, as in initialize).
    `model_parameters`: params or param-group dicts, as `initialize` takes them.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    structured = not isinstance(model, Numel)
    out = []
    for stage in stages:
        cfg = zero_config(config, stage=stage, world_size=world_size, precision=precision,
                          optimizer=optimizer)  # fmt: skip
        cfg = cfg.resolve_auto(hidden_size_of(model))
        model.to(cfg.compute_dtype)
        if stage < 3:
            report, comm = _stage012(_groups(model, model_parameters), cfg, world_size)
            per_rank, peak = [report], None
        else:
            per_rank, peak_bytes, comm = _stage3(
                model, cfg, world_size, _sample_ranks(world_size), structured,
                _group_of(model, model_parameters),
            )
            peak = peak_bytes if structured else None
        for r in per_rank:
            r["total"] = sum(r[c] for c in CATEGORIES)
        worst = max(per_rank, key=lambda r: r["total"])
        total = worst["total"] + (peak or 0)
        fits = None if device_memory is None else total <= device_memory
        out.append(StageEstimate(stage, dict(worst), peak, total, comm, per_rank, fits))
    return out


def as_dict(estimates: list[StageEstimate]) -> list[dict[str, Any]]:
    return [asdict(e) for e in estimates]

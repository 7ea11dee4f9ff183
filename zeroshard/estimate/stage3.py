"""Stage 3 for `estimate/model_states.py`: bytes per rank from the unit planner, and the
gathered peak and bytes sent from the real engine run on the meta device.

The schedule is not modelled: `build_units` and `Stage3Engine` (the code `initialize` runs)
are built over a `MetaComm` that moves nothing and counts what a rank would send, and the
model runs forward and backward on an example input until the engine's recorded orders
repeat (the first pass only records them, as the first training step does). The engine's
`GatherTracker` peak is then the gathered peak of every later step, whatever the call
order: modules called several times, parameters used outside their owner, skipped modules.

Without an example input the engine runs on one synthesized from the model's first layer
(replay.py); when none can be made or the forward fails on the meta device (a
data-dependent branch), it runs on a stand-in that calls every module once in registration
order, which runs LOW for reused modules. The result says which one was used (`schedule`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from zeroshard.comm.meta import MetaComm
from zeroshard.comm.topology import inter_fraction
from zeroshard.config.schema import ZeroConfig
from zeroshard.config.zeropp import ZeroPPConfig
from zeroshard.estimate.offload import with_offload
from zeroshard.estimate.replay import RegistrationOrder, input_candidates, stand_in_input
from zeroshard.quant8.codec import codec_for
from zeroshard.shard.codec import FP32, StateCodec
from zeroshard.stage3 import registry
from zeroshard.stage3.build import make_engine, make_units
from zeroshard.stage3.unit import GatherTracker
from zeroshard.stage3.zeropp import ZeroPP, meta_zeropp
from zeroshard.update import apply as update

ELEM = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
TRACED = "traced"  # `Stage3Result.schedule` when the engine ran on the example input
SYNTHESIZED = "synthesized input: "  # then what it was: the engine ran on that input
REGISTRATION = "registration order: "  # then why: the engine ran on `RegistrationOrder`
NO_LAYERS = "none: a parameter count has no layers (each gathered once per pass)"
MAX_PASSES = 5  # forward+backward passes at most: one to record, then until two agree
NORM_BYTES = 16  # the global grad-norm / inf-check all-reduce after each backward


@dataclass
class Stage3Result:
    per_rank: list[dict[str, int]]  # bytes by category, one dict per planned rank
    peak: int  # bytes of full parameters gathered at the peak of forward/backward
    comm: int  # bytes a rank sends per step (after the first)
    schedule: str  # TRACED, or why the registration-order replay was used
    comm_inter: int = 0  # of `comm`, to ranks on other nodes
    hpz_secondary: int = 0  # ZeRO++ hpZ: secondary shards held from forward to the update


def state_tensors(cfg: ZeroConfig) -> int:
    """fp32 state tensors per master element for the configured rule."""
    rule, hp = cfg.optimizer_spec()
    return len(update.init_state(rule, hp, [torch.empty(1, device="meta")]))


def state_codec(cfg: ZeroConfig) -> Any:
    """The configured rule's state codec when it stores state per parameter piece (AdamW8bit:
    `piece_bytes`), else None (fp32 states: `state_tensors` per master element)."""
    rule, hp = cfg.optimizer_spec()
    codec, _ = codec_for(rule, hp, FP32)
    return codec if hasattr(codec, "piece_bytes") else None


def _trainable_pieces(u: Any) -> Iterator[tuple[int, int]]:
    """(parameter numel, piece numel) of this rank's pieces of `u`'s trainable parameters:
    what the stage-3 optimizer keeps master and state for (padding excluded)."""
    for s in u.slots:
        if s.param.requires_grad:
            for _, a, z in u.chunk_overlaps(s.offset, s.offset + s.numel):
                yield s.numel, z - a


def _forget_units(model: nn.Module, shapes: dict[int, tuple[torch.Size, torch.dtype]]) -> None:
    """Undo what building units (and running) did to the meta model: placeholders, gradients,
    the unit registry."""
    for p in model.parameters():
        registry.clear_unit(p)
        shape, dtype = shapes[id(p)]
        p.data = torch.empty(shape, dtype=dtype, device="meta")
        p.grad = None


def _inputs(example: Any, device: torch.device, dtype: torch.dtype) -> tuple[tuple, dict]:
    """(args, kwargs) from a tensor, a tuple of positional arguments or a dict of keyword
    arguments; tensors move to the model's device, floating ones to the compute dtype."""

    def move(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

    if isinstance(example, Mapping):
        return (), tree_map(move, dict(example))
    if isinstance(example, tuple):
        return tree_map(move, example), {}
    return (move(example),), {}


def _step(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """One training forward, and a backward from every floating output that needs a
    gradient (the loss's own ops hold no parameters, so their shape does not matter)."""
    with torch.enable_grad():
        out = model(*args, **kwargs)
        leaves = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        roots = [t.float().sum() for t in leaves if t.requires_grad and t.is_floating_point()]
        if roots:
            torch.autograd.backward(roots)


def _trace(
    model: nn.Module, units: list[Any], comm: MetaComm, tracker: GatherTracker,
    cfg: ZeroConfig, example: Any, local: int | None = None,
) -> tuple[int, int, int, int]:
    """(peak gathered bytes, bytes sent in forward and backward, of them inter-node, hpZ's
    secondary bytes at the end of backward) of the engine's steady schedule: the largest over
    the passes after the first, stopping once two agree. With ZeRO++ in the config the engine
    runs its codecs and subgroups (on meta)."""
    engine = make_engine(model, units, comm, cfg, tracker, _meta_zeropp(comm, cfg, local))
    device = next((u.device for u in units), torch.device("meta"))
    args, kwargs = _inputs(example, device, cfg.compute_dtype)
    seen: list[tuple[int, int, int, int]] = []
    try:
        for _ in range(MAX_PASSES):
            tracker.reset_peak()
            comm.counter.snapshot()
            _step(model, args, kwargs)
            held = sum(t.numel() * t.element_size() for t in engine.secondary_tensors())
            engine.params_changed()  # the update's: hpZ's secondary shards go
            sent = comm.counter.snapshot()
            seen.append((tracker.peak, sent["total"], sent["inter_node"], held))
            if len(seen) >= 3 and seen[-1] == seen[-2]:
                break
    finally:
        engine.remove()
    steady = seen[1:]
    return tuple(max(s[k] for s in steady) for k in range(4))  # type: ignore[return-value]


def _meta_zeropp(comm: MetaComm, cfg: ZeroConfig, local: int | None) -> ZeroPP | None:
    zpp = ZeroPPConfig.of(cfg.zero_optimization)
    if not zpp.enabled:
        return None
    return meta_zeropp(comm, zpp, local)


def _synthesize(model: nn.Module, dtype: torch.dtype) -> tuple[Any, str] | str:
    """(input, schedule) for the first synthesized input the model's forward runs on
    (meta device, no gradients, before any unit exists), else why there is none."""
    device = next((p.device for p in model.parameters()), torch.device("meta"))
    tried = []
    for label, x in input_candidates(model):
        args, kwargs = _inputs(x, device, dtype)
        try:  # the trace repeats whatever the forward warns about: the probe stays quiet
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model(*args, **kwargs)
            return x, SYNTHESIZED + label
        except Exception as e:  # noqa: BLE001 - the user's forward: say it, try the next
            tried.append(f"{label}: {_one_line(e)}")
    if not tried:
        return "no example input was given, and none could be synthesized for this forward"
    return f"no example input was given, and the forward ran on no synthesized one ({tried[0]})"


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def _run(
    model: nn.Module, runner: nn.Module, example: Any, shapes: dict, cfg: ZeroConfig,
    world: int, rank: int, group_of: dict[int, int] | None, codec: StateCodec,
    local: int | None = None,
) -> tuple[int, int, int, int]:
    """`_trace` of `runner` (the model, or a stand-in sharing its parameters) over fresh units
    of `model` for `rank`: a failed earlier run leaves nothing behind."""
    _forget_units(model, shapes)
    comm = MetaComm(world, rank, inter_fraction=inter_fraction(world, local, rank))
    tracker = GatherTracker()
    units = make_units(model, comm, cfg, tracker, group_of, codec)
    return _trace(runner, units, comm, tracker, cfg, example, local)


def _schedule(
    model: nn.Module, first: tuple[Any, str] | str, shapes: dict, cfg: ZeroConfig, world: int,
    rank: int, group_of: dict[int, int] | None, codec: StateCodec, local: int | None = None,
) -> tuple[int, int, int, int, str]:
    """(peak gathered bytes, bytes sent in forward and backward, of them inter-node, hpZ's
    secondary bytes, schedule): the engine on
    `first` (an input and its schedule name, given or synthesized), else on the model's
    registration order."""
    why = first if isinstance(first, str) else ""
    if not why:
        example, schedule = first
        try:
            return (*_run(model, model, example, shapes, cfg, world, rank, group_of, codec,
                          local), schedule)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - any failure of the user's forward: say it
            run = ("the traced run" if schedule == TRACED else
                   f"the run on a {schedule.removeprefix(SYNTHESIZED)}")  # fmt: skip
            why = f"{run} failed ({_one_line(e)})"
    stand_in = RegistrationOrder(model)
    peak, sent, inter, held = _run(model, stand_in, stand_in_input(cfg.compute_dtype), shapes,
                                   cfg, world, rank, group_of, codec, local)  # fmt: skip
    return peak, sent, inter, held, REGISTRATION + why


def stage3(
    model: nn.Module, cfg: ZeroConfig, world: int, ranks: list[int], *, structured: bool,
    group_of: dict[int, int] | None, example_input: Any = None, codec: StateCodec = FP32,
    local: int | None = None,
) -> Stage3Result:
    """Per-rank bytes, gathered peak and bytes sent at stage 3. Without layers (`Numel`)
    every parameter is taken as gathered once in forward and once in backward, the paper's
    3Ψ per step."""
    elem, red = ELEM[cfg.compute_dtype], ELEM[cfg.reduce_dtype]
    states = state_tensors(cfg)
    piece_codec = state_codec(cfg)  # AdamW8bit: state per parameter piece
    shapes = {id(p): (p.shape, p.dtype) for p in model.parameters()}
    # the input to run the engine on, found while the parameters are whole (before any unit)
    first: tuple[Any, str] | str = NO_LAYERS
    if structured:
        first = ((example_input, TRACED) if example_input is not None
                 else _synthesize(model, cfg.compute_dtype))  # fmt: skip
    per_rank = []
    units: list[Any] = []
    tracker = GatherTracker()
    for rank in ranks:
        if rank != ranks[0]:
            _forget_units(model, shapes)
        comm = MetaComm(world, rank)
        units = make_units(model, comm, cfg, tracker, group_of, piece_codec or codec)
        pieces = sum(n for u in units if u.trainable for _, n in _trainable_pieces(u))
        shards = sum(u.shard_numel * elem for u in units if not u.persistent)
        state = states * codec.stored_bytes(pieces) if piece_codec is None else sum(
            piece_codec.piece_bytes(total, n)
            for u in units if u.trainable for total, n in _trainable_pieces(u))
        per_rank.append(with_offload({
            "params": sum(u.full_bytes if u.persistent else u.shard_numel * elem for u in units),
            "grads": sum(u.shard_numel * red for u in units if u.trainable),
            "master": 0 if elem == 4 else pieces * 4,
            "optimizer_states": state,
            "comm_buffers": 0,
        }, cfg, pieces, shards))  # fmt: skip
    ring = (world - 1) / world
    away = inter_fraction(world, local, ranks[-1])
    persistent = sum(u.numel for u in units if u.trainable and u.persistent)
    # the step's own: persistent units all-gathered after the update, the grad-norm all-reduce
    after = (persistent * elem + 2 * NORM_BYTES) * ring if world > 1 else 0.0
    if not structured:  # hpZ: at most 1/P of every unit, from forward to the update
        hpz = ZeroPPConfig.of(cfg.zero_optimization).hpz_partition_size if world > 1 else 1
        secondary = sum(u.numel // hpz * elem for u in units if not u.persistent) if hpz > 1 else 0
        gathers = 2 * sum(u.numel for u in units if not u.persistent)
        reduced = sum(u.numel for u in units if u.trainable) * red
        sent = (gathers * elem + reduced) * ring if world > 1 else 0.0
        _forget_units(model, shapes)
        return Stage3Result(per_rank, 0, int(round(sent + after)), NO_LAYERS,
                            int(round((sent + after) * away)), secondary)  # fmt: skip
    peak, sent, inter, secondary, schedule = _schedule(model, first, shapes, cfg, world,
                                                       ranks[-1], group_of, piece_codec or codec,
                                                       local)  # fmt: skip
    _forget_units(model, shapes)
    return Stage3Result(per_rank, peak, int(round(sent + after)), schedule,
                        int(round(inter + after * away)), secondary)  # fmt: skip

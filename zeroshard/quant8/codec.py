"""`Blockwise8bit`: the shard-group codec of AdamW8bit (rule "adamw8bit").

A shard group's state is stored per segment (one parameter's run inside one master piece):
- a parameter with at least `min_8bit_size` elements (its GLOBAL count) keeps
  `exp_avg_codes`, `exp_avg_absmax`, `exp_avg_sq_codes`, `exp_avg_sq_absmax`
  (docs/adamw8bit.md); its segment starts on a block boundary of the parameter, because the
  codec's `alignment` makes the layout planner start the parameter at a flat offset that is a
  multiple of `block_size` and cut chunks at multiples of it;
- a smaller one keeps fp32 `exp_avg` / `exp_avg_sq` and the ordinary fused AdamW step.

The update is fused (`update`): each 8-bit segment is dequantized, updated and requantized in
one pass (`quant8.adamw8bit_step_`); no fp32 copy of the state exists between steps.
`decode`/`encode` exist for loading fp32 state written from outside (`state_dict`), not for the
step. Checkpoints save and load `piece_states` as they are: codes and absmax move between
world sizes and stages without requantizing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from zeroshard.quant8.format import (
    BLOCK_SIZE,
    MIN_8BIT_SIZE,
    check_block_size,
    dequantize_blockwise,
    init_state8,
    quantize_blockwise,
    state_bytes,
    uses_8bit,
)
from zeroshard.quant8.step import adamw8bit_step_
from zeroshard.shard.codec import Segment, States
from zeroshard.update import apply as update

FP32_NAMES = ("exp_avg", "exp_avg_sq")
_SIGNED = {"exp_avg": True, "exp_avg_sq": False}


class Blockwise8bit:
    """Blockwise 8-bit AdamW states (unbound: the optimizer-wide settings)."""

    name = "blockwise8bit"

    def __init__(self, block_size: int = BLOCK_SIZE, min_8bit_size: int = MIN_8BIT_SIZE) -> None:
        check_block_size(int(block_size))
        if int(min_8bit_size) < 1:
            raise ValueError(f"min_8bit_size must be >= 1, got {min_8bit_size}")
        self.block_size = int(block_size)
        self.min_8bit_size = int(min_8bit_size)

    def config(self) -> dict[str, Any]:
        """What a checkpoint records (and a load must match)."""
        return {"name": self.name, "block_size": self.block_size,
                "min_8bit_size": self.min_8bit_size}  # fmt: skip

    def alignment(self, numel: int) -> int:
        return self.block_size if uses_8bit(numel, self.min_8bit_size) else 1

    def stored_bytes(self, numel: int) -> int:
        """Bytes of ONE state (half of exp_avg + exp_avg_sq) of a whole parameter."""
        return state_bytes(numel, self.block_size, self.min_8bit_size) // 2

    def piece_bytes(self, param_numel: int, numel: int) -> int:
        """Bytes of both states of one piece of `numel` elements of a parameter of
        `param_numel` (pieces start on blocks): what a rank stores for it."""
        if not uses_8bit(param_numel, self.min_8bit_size):
            return 8 * numel
        return 2 * numel + 8 * (-(-numel // self.block_size))

    def bind(self, segments: list[Segment], master: list[Tensor]) -> BoundBlockwise8bit:
        return BoundBlockwise8bit(self, segments, master)

    # An unbound codec stores nothing itself: a group always binds it first.
    def encode_new(self, working: States) -> States:
        raise TypeError("Blockwise8bit must be bound to a shard group (ShardGroup binds it)")

    decode = encode = encode_new


class BoundBlockwise8bit:
    """The codec of one shard group: knows which segment is 8-bit and where it sits."""

    name = "blockwise8bit"

    def __init__(self, spec: Blockwise8bit, segments: list[Segment], master: list[Tensor]):
        self.spec = spec
        self.block_size = spec.block_size
        bs = self.block_size
        self.master = master
        self.q8 = [s for s in segments if uses_8bit(s.param_numel, spec.min_8bit_size)]
        self.fp = [s for s in segments if not uses_8bit(s.param_numel, spec.min_8bit_size)]
        for s in self.q8:
            if s.start % bs or (s.numel % bs and s.start + s.numel != s.param_numel):
                raise ValueError(
                    f"8-bit states need pieces on {bs}-element block boundaries, got elements "
                    f"[{s.start}, {s.start + s.numel}) of a parameter of {s.param_numel} (a "
                    "layout not planned with this codec's alignment, e.g. zeroshard.Init "
                    "units built before the optimizer)"
                )  # fmt: skip
        starts, pos = [], 0
        for m in master:
            starts.append(pos)
            pos += m.numel()
        self._where: dict[int, tuple[bool, int]] = {}
        for kind, segs in ((True, self.q8), (False, self.fp)):
            for i, s in enumerate(segs):
                self._where[starts[s.piece] + s.offset] = (kind, i)

    # -- StateCodec ---------------------------------------------------------------------------
    def stored_bytes(self, numel: int) -> int:
        return self.spec.stored_bytes(numel)

    def _view(self, ts: list[Tensor], s: Segment) -> Tensor:
        return ts[s.piece].reshape(-1)[s.offset : s.offset + s.numel]

    def encode_new(self, working: States) -> States:
        """Zero states (or `working`'s values, quantized) for every segment."""
        dev = self.master[0].device if self.master else torch.device("cpu")
        out: States = {k: [] for k in ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes",
                                       "exp_avg_sq_absmax", *FP32_NAMES)}  # fmt: skip
        for s in self.q8:
            for k, t in init_state8(s.numel, self.block_size, dev).items():
                out[k].append(t)
        for s in self.fp:
            for k in FP32_NAMES:
                out[k].append(torch.zeros(s.numel, dtype=torch.float32, device=dev))
        if working:
            self.encode(working, out)
        return out

    def decode(self, stored: States) -> States:
        """fp32 exp_avg / exp_avg_sq aligned with the master pieces (zeros in padding)."""
        out: States = {k: [torch.zeros_like(m) for m in self.master] for k in FP32_NAMES}
        for i, s in enumerate(self.q8):
            for k in FP32_NAMES:
                vals = dequantize_blockwise(stored[f"{k}_codes"][i], stored[f"{k}_absmax"][i],
                                            _SIGNED[k], self.block_size)  # fmt: skip
                self._view(out[k], s).copy_(vals)
        for i, s in enumerate(self.fp):
            for k in FP32_NAMES:
                self._view(out[k], s).copy_(stored[k][i])
        return out

    @torch.no_grad()
    def encode(self, working: States, stored: States) -> None:
        """Quantize fp32 state written from outside (a requantization: not bit-preserving)."""
        for i, s in enumerate(self.q8):
            for k in FP32_NAMES:
                codes, absmax = quantize_blockwise(self._view(working[k], s), _SIGNED[k],
                                                   self.block_size)  # fmt: skip
                stored[f"{k}_codes"][i].copy_(codes)
                stored[f"{k}_absmax"][i].copy_(absmax)
        for i, s in enumerate(self.fp):
            for k in FP32_NAMES:
                stored[k][i].copy_(self._view(working[k], s))

    # -- the layout extras --------------------------------------------------------------------
    def piece_states(self, stored: States, shard_offset: int, numel: int
                     ) -> dict[str, tuple[Tensor, int]]:  # fmt: skip
        found = self._where.get(shard_offset)
        if found is None:
            raise ValueError(f"no parameter piece starts at shard element {shard_offset}")
        q8, i = found
        seg = (self.q8 if q8 else self.fp)[i]
        if seg.numel != numel:
            raise ValueError(f"the piece at shard element {shard_offset} has {seg.numel} "
                             f"elements, not {numel}")  # fmt: skip
        if not q8:
            return {k: (stored[k][i], 1) for k in FP32_NAMES}
        out = {}
        for k in FP32_NAMES:
            out[f"{k}_codes"] = (stored[f"{k}_codes"][i], 1)
            out[f"{k}_absmax"] = (stored[f"{k}_absmax"][i], self.block_size)
        return out

    @torch.no_grad()
    def update(
        self, rule: str, master: list[Tensor], grads: list[Tensor], stored: States, *,
        lr: float, step: int, hp: dict[str, Any], grad_scale: float | None,
        model_copies: list[Tensor] | None, backend: str,
    ) -> None:  # fmt: skip
        """8-bit segments: one fused pass each; fp32 ones: one fused AdamW over all of them."""
        if rule != "adamw8bit":
            raise ValueError(f"the blockwise 8-bit codec runs rule 'adamw8bit', not {rule!r}")
        beta1, beta2 = hp["betas"]
        for i, s in enumerate(self.q8):
            adamw8bit_step_(
                self._view(master, s), self._view(grads, s),
                stored["exp_avg_codes"][i], stored["exp_avg_absmax"][i],
                stored["exp_avg_sq_codes"][i], stored["exp_avg_sq_absmax"][i],
                lr=lr, beta1=beta1, beta2=beta2, eps=hp["eps"],
                weight_decay=hp["weight_decay"], step=step, block_size=self.block_size,
                grad_scale=grad_scale,
                model_copy=None if model_copies is None else self._view(model_copies, s),
                backend=backend,  # type: ignore[arg-type]
            )  # fmt: skip
        if self.fp:
            update.apply_update(
                "adamw", [self._view(master, s) for s in self.fp],
                [self._view(grads, s) for s in self.fp],
                {k: list(stored[k]) for k in FP32_NAMES}, lr=lr, step=step,
                hp={**hp, "amsgrad": False, "maximize": False}, grad_scale=grad_scale,
                model_copies=None if model_copies is None
                else [self._view(model_copies, s) for s in self.fp],
                backend=backend,  # type: ignore[arg-type]
            )  # fmt: skip


CODEC_KEYS = ("block_size", "min_8bit_size")


def codec_for(rule: str, hp: dict[str, Any], codec: Any) -> tuple[Any, dict[str, Any]]:
    """(the state codec, the remaining hyperparameters) for `rule`: "adamw8bit" takes its
    block_size / min_8bit_size out of `hp` into a `Blockwise8bit` (unless one was passed);
    any other rule keeps `codec` and refuses the 8-bit keys."""
    given = {k: hp[k] for k in CODEC_KEYS if k in hp}
    rest = {k: v for k, v in hp.items() if k not in CODEC_KEYS}
    if not (isinstance(rule, str) and rule.lower() == "adamw8bit"):
        if given:
            raise ValueError(f"{sorted(given)} configure 8-bit states: only for 'adamw8bit'")
        if isinstance(codec, Blockwise8bit):
            raise ValueError(f"the blockwise 8-bit codec runs rule 'adamw8bit', not {rule!r}")
        return codec, rest
    if isinstance(codec, Blockwise8bit):
        want = Blockwise8bit(**given).config() if given else codec.config()
        if want != codec.config():
            raise ValueError(f"block_size/min_8bit_size {given} differ from the codec passed "
                             f"({codec.config()})")  # fmt: skip
        return codec, rest
    if getattr(codec, "name", "fp32") != "fp32":
        raise ValueError(f"rule 'adamw8bit' stores its state with Blockwise8bit, not the "
                         f"{getattr(codec, 'name', codec)!r} codec")  # fmt: skip
    return Blockwise8bit(**given), rest


def group_defaults(codec: Any) -> dict[str, Any]:
    """The 8-bit settings every param group of an "adamw8bit" optimizer carries (a group may
    set its own; checkpoints record them per group): the optimizer-wide codec's. None for
    any other codec."""
    if isinstance(codec, Blockwise8bit):
        return {"block_size": codec.block_size, "min_8bit_size": codec.min_8bit_size}
    return {}


def group_codec(codec: Any, group: Mapping[str, Any], where: str = "param group") -> Any:
    """The state codec of one param group: `codec`, or a `Blockwise8bit` built from the
    group's own block_size / min_8bit_size. Any other codec refuses those keys."""
    given = {k: group[k] for k in CODEC_KEYS if k in group}
    if not isinstance(codec, Blockwise8bit):
        if given:
            raise ValueError(f"{where} sets {sorted(given)}: 8-bit state settings, only for "
                             "optimizer 'adamw8bit'")  # fmt: skip
        return codec
    want = {**group_defaults(codec), **given}
    if want == group_defaults(codec):
        return codec
    try:
        return Blockwise8bit(**want)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def stored_block(config: Mapping[str, Any] | None, numel: int) -> int:
    """How a parameter of `numel` (global) elements keeps its AdamW states under a codec
    `config()` (None: fp32 states): its block size when 8-bit, 0 when fp32."""
    if config is None or config.get("name") != Blockwise8bit.name:
        return 0
    return int(config["block_size"]) if uses_8bit(numel, int(config["min_8bit_size"])) else 0

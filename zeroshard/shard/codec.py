"""How a shard group stores its optimizer state: a codec.

The update rules (`update.py`) work on fp32 state pieces aligned element for element with the
fp32 master pieces. A codec decides what is *stored* between steps: `Fp32States` stores exactly
that working form (decode and encode are free: the stored tensors are the working ones). A
codec that stores less (fp16 states, 8-bit blockwise states) decodes into fp32 working tensors
before the update and encodes them back after it; checkpoints, accounting and the estimator
see it only through this protocol, so stage code never changes for a new codec.

A codec may also offer the optional members of `LayoutCodec` (checked with `getattr`, so the
plain protocol stays four methods): an `alignment` the layout planner honours, a `bind` that
gives it one group's parameter segments, a fused `update` that replaces decode -> fp32 update
-> encode, and `piece_states`, the stored tensors of one parameter piece (what checkpoints
save and load as they are).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

States = dict[str, list[Tensor]]  # state name -> one tensor per master piece


@dataclass(frozen=True)
class Segment:
    """One parameter's run of elements inside one master piece of a shard group."""

    piece: int  # index of the master piece
    offset: int  # first element inside that piece
    numel: int
    start: int  # first element in the parameter's global (flattened) index
    param_numel: int  # the parameter's global element count (never a shard's)


@runtime_checkable
class StateCodec(Protocol):
    """Stored form <-> fp32 working form of one shard group's optimizer state."""

    name: str

    def encode_new(self, working: States) -> States:
        """The stored form of freshly initialised fp32 `working` state."""
        ...

    def decode(self, stored: States) -> States:
        """fp32 tensors, one per master piece, that the update may modify in place."""
        ...

    def encode(self, working: States, stored: States) -> None:
        """Write updated `working` (from `decode`) back into `stored`."""
        ...

    def stored_bytes(self, numel: int) -> int:
        """Bytes one state of `numel` elements takes when stored (the estimator's rule)."""
        ...


class LayoutCodec(StateCodec, Protocol):
    """The optional members a codec that stores state per parameter block may add."""

    def alignment(self, numel: int) -> int:
        """Flat-offset multiple a parameter of `numel` (global) elements must start at; the
        planner also makes every chunk a multiple of the largest alignment it used."""
        ...

    def bind(self, segments: list[Segment], master: list[Tensor]) -> StateCodec:
        """The codec of one shard group, given where each parameter sits in its master."""
        ...

    def update(
        self, rule: str, master: list[Tensor], grads: list[Tensor], stored: States, *,
        lr: float, step: int, hp: dict[str, Any], grad_scale: float | None,
        model_copies: list[Tensor] | None, backend: str,
    ) -> None:  # fmt: skip
        """One fused step on the stored form (no fp32 copy of the whole state)."""
        ...

    def piece_states(
        self, stored: States, shard_offset: int, numel: int
    ) -> dict[str, tuple[Tensor, int]]:
        """Stored tensors of one parameter piece (elements [shard_offset, +numel) of the
        shard), as (1-D view, parameter elements per entry) by stored-state name."""
        ...


def alignment_of(codec: Any) -> Any:
    """`codec.alignment` when it has one, else None (the planner's default alignment)."""
    return getattr(codec, "alignment", None)


class Fp32States:
    """The default: state stored as fp32 pieces, the very tensors the update writes."""

    name = "fp32"

    def encode_new(self, working: States) -> States:
        return working

    def decode(self, stored: States) -> States:
        return stored

    def encode(self, working: States, stored: States) -> None:
        return None  # `working` is `stored`

    def stored_bytes(self, numel: int) -> int:
        return 4 * numel


FP32 = Fp32States()

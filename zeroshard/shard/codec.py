"""How a shard group stores its optimizer state: a codec.

The update rules (`update.py`) work on fp32 state pieces aligned element for element with the
fp32 master pieces. A codec decides what is *stored* between steps: `Fp32States` stores exactly
that working form (decode and encode are free: the stored tensors are the working ones). A
codec that stores less (fp16 states, 8-bit blockwise states) decodes into fp32 working tensors
before the update and encodes them back after it; checkpoints, accounting and the estimator
see it only through this protocol, so stage code never changes for a new codec.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

States = dict[str, list[Tensor]]  # state name -> one tensor per master piece


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

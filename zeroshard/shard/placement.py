"""Where a shard group keeps its fp32 master and optimizer state: a placement.

`OnDevice` keeps them with the parameters; when the parameters are fp32 the master pieces
*are* views of the parameters' shard (no copy), and for bf16/fp16 parameters the update kernel
writes the rounded copies in its own pass. A placement elsewhere (host memory:
`zeroshard.shard.offload.HostOffload`) keeps its own master buffer: the group copies gradients
in before the update (`stage_grads`) and the updated values back to the parameters after it
(`write_params`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Placement(Protocol):
    """Memory for one shard group's master and state, and the copies in and out of it."""

    name: str

    def shares_params(self, param_dtype: torch.dtype) -> bool:
        """True when the fp32 master may be the parameters' own shard (no separate copy)."""
        ...

    def allocate(self, numel: int, like: Tensor) -> Tensor:
        """A zeroed fp32 buffer of `numel` elements for the master of a group on `like`'s
        device; state tensors are allocated like the master pieces they align with."""
        ...

    def stage_grads(self, grads: list[Tensor]) -> list[Tensor]:
        """The gradient pieces where the update runs (a copy when the master lives apart)."""
        ...

    def write_params(self, master: list[Tensor], params: list[Tensor]) -> None:
        """The parameters' pieces take the updated master pieces (rounded when low precision).
        Called after the update when the master is not the parameters' own shard."""
        ...


class OnDevice:
    """Master and state next to the parameters (the default)."""

    name = "device"

    def shares_params(self, param_dtype: torch.dtype) -> bool:
        return param_dtype == torch.float32

    def allocate(self, numel: int, like: Tensor) -> Tensor:
        return torch.zeros(numel, dtype=torch.float32, device=like.device)

    def stage_grads(self, grads: list[Tensor]) -> list[Tensor]:
        return grads

    @torch.no_grad()
    def write_params(self, master: list[Tensor], params: list[Tensor]) -> None:
        for p, m in zip(params, master):
            p.view(-1).copy_(m)


ON_DEVICE = OnDevice()

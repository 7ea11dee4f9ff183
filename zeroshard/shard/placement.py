"""Where a shard group keeps its fp32 master and optimizer state: a placement.

`OnDevice` keeps them with the parameters; when the parameters are fp32 the master pieces
*are* views of the parameters' shard (no copy), and for bf16/fp16 parameters the update kernel
writes the rounded copies in its own pass. A placement elsewhere (host memory:
`zeroshard.shard.offload.HostOffload`) keeps its own master buffer: the group copies gradients
in before the update (`stage_grads`) and the updated values back to the parameters after it
(`write_params`).

A placement may also take each reduced gradient range as the reduction lands during backward
(`GradLanding`), so its copy in overlaps the rest of backward instead of waiting for the step.
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


@runtime_checkable
class GradLanding(Protocol):
    """A placement that copies gradients in as they are reduced, not at step time (optional).

    The shard group registers its gradient pieces (`track_grads`); the stage's gradient path
    then calls `grads_landed` every time reduced values land in a range of its gradient
    buffers (in order, on the host thread, after the wait on the collective and any add into
    the range), and `grads_reset` before it zeroes them. A range written and not landed again
    is copied at step time by `stage_grads`, so a late or missing call costs only overlap."""

    def track_grads(self, grads: list[Tensor]) -> None:
        """The gradient pieces one shard group will hand to `stage_grads` (fixed views)."""
        ...

    def grads_landed(self, target: Tensor, value: Tensor | None = None) -> None:
        """Reduced gradients landed in `target` (a 1-D view of a gradient buffer); `value`
        holds them when they are still in a temporary that is copied into `target` later."""
        ...

    def grads_reset(self) -> None:
        """The gradient buffers are about to be zeroed: copies made so far are stale, and
        nothing may still be reading the buffers when the zeroing runs."""
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

"""Per-device buffers reused by every optimizer step (apply.py, lion.py).

lr/step/scale live in 0-d tensors rewritten only when they change, so neither a scheduler nor a
new step forces a recompile, an allocation or a host sync; the upcast scratch buffer is grown,
never reallocated per step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

_SCALARS: dict[tuple[torch.device, str], list[Any]] = {}
_SCRATCH: dict[torch.device, Tensor] = {}


def scalar(device: torch.device, name: str, value: float) -> Tensor:
    entry = _SCALARS.get((device, name))
    if entry is None:
        t = torch.full((), value, dtype=torch.float32, device=device)
        _SCALARS[(device, name)] = [t, value]
        return t
    if entry[1] != value:
        entry[0].fill_(value)
        entry[1] = value
    return entry[0]


def scratch(device: torch.device, numel: int) -> Tensor:
    buf = _SCRATCH.get(device)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=torch.float32, device=device)
        _SCRATCH[device] = buf
    return buf[:numel]

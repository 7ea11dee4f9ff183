"""The small types a stage-3 unit is made of: its state, a parameter's slot, the gathered-bytes
tracker and the protocol of a gather shared with other units (coalesce.py)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

import torch
from torch import Tensor, nn

ShardedUnit = Any  # stage3/unit.py's (which imports this module)


class UnitState(Enum):
    """A unit's full parameters: absent, being all-gathered, or in place."""

    RELEASED = "released"
    GATHERING = "gathering"
    GATHERED = "gathered"


RELEASED, GATHERING, GATHERED = UnitState.RELEASED, UnitState.GATHERING, UnitState.GATHERED


@dataclass
class GatherTracker:
    """Bytes of gathered full parameters alive right now, and their peak (instrumentation for
    the memory bound: peak <= largest layer + prefetch bucket)."""

    current: int = 0
    peak: int = 0

    def add(self, nbytes: int) -> None:
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def sub(self, nbytes: int) -> None:
        self.current -= nbytes

    def reset_peak(self) -> None:
        self.peak = self.current


class GatherSource(Protocol):
    """A collective shared with other units (coalesce.SharedGather): whether it reads hpZ's
    secondary shards, and whether what it brings is exact (not quantized on the wire)."""

    from_secondary: bool
    exact: bool

    def fill(self, unit: ShardedUnit, full: Tensor) -> None: ...
    def done(self, unit: ShardedUnit) -> None: ...


@dataclass(frozen=True)
class UnitSlot:
    """Where one parameter lives in its unit's flat range. The parameter is held weakly: the
    registry maps it to the unit, and a strong reference back would keep both alive forever."""

    ref: weakref.ref
    offset: int
    numel: int
    shape: torch.Size
    bucket: int

    @property
    def param(self) -> nn.Parameter:
        return self.ref()

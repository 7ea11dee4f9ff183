"""DeepSpeed's warmup learning-rate schedules as standard torch ``LRScheduler`` subclasses.

Formulas follow ``deepspeed/runtime/lr_schedules.py`` exactly, so a DeepSpeed config trains with
the same learning rates. Being ``LRScheduler`` subclasses they work with any torch optimizer
(zeroshard's or not) and round-trip through ``state_dict``/``load_state_dict``.

Step counting: DeepSpeed's ``last_batch_iteration`` starts at -1 and its engine calls
``scheduler.step()`` after every optimizer step. torch's ``last_epoch`` starts at 0 after
construction, so here ``last_batch_iteration == last_epoch - 1``: right after construction the
lr is DeepSpeed's value for iteration -1 (warmup_min_lr, or 0 for WarmupCosineLR), exactly what
DeepSpeed's first optimizer step uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

if TYPE_CHECKING:
    from zeroshard.config.schema import SchedulerConfig

__all__ = ["WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "build_scheduler"]


def _per_group(optimizer: Optimizer, value: float | Sequence[float], name: str) -> list[float]:
    """A scalar for every param group, or one value per group (as DeepSpeed allows)."""
    n = len(optimizer.param_groups)
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"expected {n} values for {name} (one per param group), got {value}")
        return [float(v) for v in value]
    return [float(value)] * n  # type: ignore[arg-type]


def _warmup_gamma(iteration: int, warmup_num_steps: int, warmup_type: str) -> float:
    """DeepSpeed's warmup fraction in [0, 1) for iteration < warmup_num_steps."""
    if warmup_type == "log":
        return math.log(iteration + 1) / math.log(warmup_num_steps)
    return iteration / warmup_num_steps


def _check_warmup(warmup_num_steps: int, warmup_type: str) -> int:
    if isinstance(warmup_num_steps, bool) or not isinstance(warmup_num_steps, int):
        raise ValueError(f"warmup_num_steps must be a positive int, got {warmup_num_steps!r}")
    if warmup_num_steps < 1:
        raise ValueError(f"warmup_num_steps must be a positive int, got {warmup_num_steps}")
    if warmup_type not in ("log", "linear"):
        raise ValueError(f"warmup_type must be 'log' or 'linear', got {warmup_type!r}")
    # DeepSpeed clamps to 2 so that log(warmup_num_steps) is never 0.
    return max(2, warmup_num_steps)


class WarmupLR(LRScheduler):
    """Warm up from warmup_min_lr to warmup_max_lr over warmup_num_steps, then hold.

    ``warmup_max_lr=None`` uses each param group's lr at construction (DeepSpeed's behaviour).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_min_lr: float | Sequence[float] = 0.0,
        warmup_max_lr: float | Sequence[float] | None = None,
        warmup_num_steps: int = 1000,
        warmup_type: str = "log",
        last_epoch: int = -1,
    ) -> None:
        self.warmup_num_steps = _check_warmup(warmup_num_steps, warmup_type)
        self.warmup_type = warmup_type
        self.min_lrs = _per_group(optimizer, warmup_min_lr, "warmup_min_lr")
        if warmup_max_lr is None:
            warmup_max_lr = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
        self.max_lrs = _per_group(optimizer, warmup_max_lr, "warmup_max_lr")
        super().__init__(optimizer, last_epoch)

    def _gamma(self, iteration: int) -> float:
        if iteration < self.warmup_num_steps:
            return _warmup_gamma(iteration, self.warmup_num_steps, self.warmup_type)
        return 1.0

    def get_lr(self) -> list[float]:  # type: ignore[override]
        iteration = self.last_epoch - 1  # DeepSpeed's last_batch_iteration
        if iteration < 0:
            return list(self.min_lrs)
        gamma = self._gamma(iteration)
        return [lo + (hi - lo) * gamma for lo, hi in zip(self.min_lrs, self.max_lrs)]

    _get_closed_form_lr = get_lr


class WarmupDecayLR(WarmupLR):
    """WarmupLR, then linear decay from warmup_max_lr to warmup_min_lr at total_num_steps."""

    def __init__(
        self,
        optimizer: Optimizer,
        total_num_steps: int,
        warmup_min_lr: float | Sequence[float] = 0.0,
        warmup_max_lr: float | Sequence[float] | None = 0.001,
        warmup_num_steps: int = 1000,
        warmup_type: str = "log",
        last_epoch: int = -1,
    ) -> None:
        self.total_num_steps = total_num_steps
        super().__init__(
            optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type, last_epoch
        )

    def _gamma(self, iteration: int) -> float:
        if iteration < self.warmup_num_steps:
            return _warmup_gamma(iteration, self.warmup_num_steps, self.warmup_type)
        remaining = self.total_num_steps - iteration
        return max(0.0, remaining / max(1.0, self.total_num_steps - self.warmup_num_steps))


class WarmupCosineLR(LRScheduler):
    """Warm up from warmup_min_ratio to 1.0 times each group's lr, then cosine-decay to
    cos_min_ratio times it at total_num_steps (and stay there)."""

    def __init__(
        self,
        optimizer: Optimizer,
        total_num_steps: int,
        warmup_min_ratio: float = 0.0,
        warmup_num_steps: int = 1000,
        cos_min_ratio: float = 0.0001,
        warmup_type: str = "log",
        last_epoch: int = -1,
    ) -> None:
        self.warmup_num_steps = _check_warmup(warmup_num_steps, warmup_type)
        self.warmup_type = warmup_type
        self.total_num_steps = total_num_steps
        self.warmup_min_ratio = warmup_min_ratio
        self.cos_min_ratio = cos_min_ratio
        super().__init__(optimizer, last_epoch)

    def lr_ratio(self, iteration: int) -> float:
        """Multiplier of the base lr at DeepSpeed iteration ``iteration``."""
        if iteration < 0:
            return 0.0
        if iteration < self.warmup_num_steps:
            gamma = _warmup_gamma(iteration, self.warmup_num_steps, self.warmup_type)
            return self.warmup_min_ratio + gamma * (1.0 - self.warmup_min_ratio)
        progress = (iteration - self.warmup_num_steps + 1) / max(
            1, self.total_num_steps - self.warmup_num_steps
        )
        cosine = (1.0 + math.cos(math.pi * min(1.0, progress))) / 2.0
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * cosine)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        ratio = self.lr_ratio(self.last_epoch - 1)
        return [float(base) * ratio for base in self.base_lrs]

    _get_closed_form_lr = get_lr


def build_scheduler(config: SchedulerConfig | None, optimizer: Optimizer) -> LRScheduler | None:
    """The scheduler a config's ``scheduler`` section asks for, or None when there is none."""
    if config is None:
        return None
    p = config.params
    if config.type == "WarmupLR":
        return WarmupLR(
            optimizer, p.warmup_min_lr, p.warmup_max_lr, p.warmup_num_steps, p.warmup_type
        )
    if config.type == "WarmupDecayLR":
        return WarmupDecayLR(
            optimizer,
            p.total_num_steps,
            p.warmup_min_lr,
            p.warmup_max_lr,
            p.warmup_num_steps,
            p.warmup_type,
        )
    if config.type == "WarmupCosineLR":
        return WarmupCosineLR(
            optimizer,
            p.total_num_steps,
            p.warmup_min_ratio,
            p.warmup_num_steps,
            p.cos_min_ratio,
            p.warmup_type,
        )
    raise ValueError(f"unknown scheduler type {config.type!r}")

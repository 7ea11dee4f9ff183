"""Mixed precision: which dtypes hold what, and fp16 loss scaling.

The model holds the compute copy (fp32, bf16 or fp16); the optimizer holds fp32 master weights.
fp16 gradients underflow without loss scaling, so fp16 runs scale the loss up before backward
and fold 1/scale into the update; an overflow (inf/nan anywhere, on any rank) skips the step
and lowers the scale. The rules are DeepSpeed's DynamicLossScaler, so a DeepSpeed user's
`fp16` section behaves the same here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("zeroshard")

def default_reduce_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """bf16 gradients are reduced in fp32 (bf16's 8-bit mantissa loses too much when summed
    across ranks); fp16 ones in fp16 (they are loss-scaled; overflow is detected and skipped);
    fp32 in fp32."""
    return torch.float16 if param_dtype == torch.float16 else torch.float32


@dataclass
class LossScaler:
    """DeepSpeed's dynamic loss scaling (`loss_scale: 0`) or a static scale (`loss_scale > 0`).

    On overflow: the scale is halved once `hysteresis` overflows have been seen (never below
    `min_scale`); after `window` steps without overflow it is doubled.
    """

    scale: float = 2.0**16
    dynamic: bool = True
    window: int = 1000
    hysteresis: int = 2
    min_scale: float = 1.0
    consecutive_hysteresis: bool = False
    factor: float = 2.0

    def __post_init__(self) -> None:
        self._cur_hysteresis = self.hysteresis
        self._iter = 0
        self._last_overflow = -1
        self.overflows = 0

    @classmethod
    def from_fp16_config(cls, fp16) -> LossScaler:
        if fp16.loss_scale and fp16.loss_scale > 0:
            return cls(scale=float(fp16.loss_scale), dynamic=False)
        return cls(
            scale=2.0**fp16.initial_scale_power,
            dynamic=True,
            window=fp16.loss_scale_window,
            hysteresis=fp16.hysteresis,
            min_scale=float(fp16.min_loss_scale),
            consecutive_hysteresis=fp16.consecutive_hysteresis,
        )

    def update(self, overflow: bool) -> None:
        """Advance one step; `overflow` says whether this step's gradients were non-finite."""
        if overflow:
            self.overflows += 1
        if not self.dynamic:
            self._iter += 1
            return
        if overflow:
            if self.hysteresis == 1 or self._cur_hysteresis == 1:
                old = self.scale
                self.scale = max(self.scale / self.factor, self.min_scale)
                log.info("fp16 overflow: loss scale %g -> %g", old, self.scale)
            else:
                self._cur_hysteresis -= 1
            self._last_overflow = self._iter
        else:
            if self.consecutive_hysteresis:
                self._cur_hysteresis = self.hysteresis
            if (self._iter - self._last_overflow) % self.window == 0:
                if not self.consecutive_hysteresis:
                    self._cur_hysteresis = self.hysteresis
                self.scale *= self.factor
        self._iter += 1

    def state_dict(self) -> dict:
        return {
            "scale": self.scale,
            "cur_hysteresis": self._cur_hysteresis,
            "iter": self._iter,
            "last_overflow": self._last_overflow,
            "overflows": self.overflows,
        }

    def load_state_dict(self, sd: dict) -> None:
        self.scale = sd["scale"]
        self._cur_hysteresis = sd["cur_hysteresis"]
        self._iter = sd["iter"]
        self._last_overflow = sd["last_overflow"]
        self.overflows = sd["overflows"]

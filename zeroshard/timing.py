"""`wall_clock_breakdown`: forward / backward / reduce / step times, as DeepSpeed prints them.

With `"wall_clock_breakdown": true`, `zeroshard.initialize` installs a `WallClockBreakdown`:
the forward is timed by a pre- and a post-forward hook on the model, the backward inside
`optimizer.backward()` (DeepSpeed times `engine.backward` the same way; a bare
`loss.backward()` is not seen), the reduce as the time `step()` (or `clip_grad_norm_`) spends
finishing the gradient reduction (what backward did not overlap), and the step as the rest
of `optimizer.step()`. Every `steps_per_print` optimizer steps rank 0 prints one line with the
mean milliseconds per step over those steps; the last line's numbers stay in `.last`.

`progress()`: the progress bar of work that can take long (save, load, consolidate,
estimate), shown on rank 0 only and only once the work has run for `PROGRESS_DELAY_S`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

PHASES = ("forward", "backward", "reduce", "step")
# a bar appears only for work that runs longer than this (ZEROSHARD_PROGRESS_DELAY overrides)
PROGRESS_DELAY_S = 2.0


def progress(items: Iterable[Any], desc: str, total: float | None = None,
             unit: str = "it", **kwargs: Any) -> Any:  # fmt: skip
    """`items` wrapped in a tqdm bar on rank 0 (stderr), shown once the work has run for
    `PROGRESS_DELAY_S` seconds; other ranks, and quick work, print nothing."""
    from tqdm.auto import tqdm

    rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    delay = float(os.environ.get("ZEROSHARD_PROGRESS_DELAY", PROGRESS_DELAY_S))
    return tqdm(items, desc=f"zeroshard: {desc}", total=total, unit=unit, delay=delay,
                disable=not rank0, file=sys.stderr, dynamic_ncols=True, **kwargs)  # fmt: skip


class WallClockBreakdown:
    """Accumulates phase times of one model + optimizer and prints them periodically.

    Forward is timed by module hooks on the model; backward, reduce and step by the
    optimizer, which enters `phase(name)` around each (`optimizer.timer`)."""

    def __init__(self, model: nn.Module, optimizer: Any, steps_per_print: int) -> None:
        self.steps_per_print = int(steps_per_print)
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.last: dict[str, float] = {}
        self.steps = 0
        self._cuda = any(p.is_cuda for p in model.parameters())
        self._fwd_start: float | None = None
        self._handles = [
            model.register_forward_pre_hook(self._forward_start),
            model.register_forward_hook(self._forward_end, always_call=True),
        ]
        optimizer.timer = self

    def _now(self) -> float:
        if self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _forward_start(self, *_: Any) -> None:
        self._fwd_start = self._now()

    def _forward_end(self, *_: Any) -> None:
        if self._fwd_start is not None:
            self.totals["forward"] += self._now() - self._fwd_start
            self._fwd_start = None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the body as `name`; a phase nested in another is subtracted from it (the
        gradient reduction that `step` finishes counts as reduce, not step)."""
        t0 = self._now()
        outer = dict(self.totals)
        try:
            yield
        finally:
            elapsed = self._now() - t0
            nested = sum(self.totals[k] - outer[k] for k in PHASES if k != name)
            self.totals[name] += elapsed - nested

    def end_step(self) -> None:
        self.steps += 1
        if self.steps % self.steps_per_print == 0:
            self._report()

    def _report(self) -> None:
        n = self.steps_per_print
        self.last = {k: 1000.0 * v / n for k, v in self.totals.items()}
        self.totals = dict.fromkeys(PHASES, 0.0)
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        parts = " | ".join(f"{k}: {self.last[k]:.2f}" for k in PHASES)
        print(
            f"zeroshard step {self.steps}: time (ms, mean of {n} steps) | {parts}", flush=True
        )

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def install(model: nn.Module, optimizer: Any, cfg: Any) -> None:
    """Attach a breakdown as `optimizer.wall_clock` when the config asks for one."""
    if cfg.wall_clock_breakdown:
        optimizer.wall_clock = WallClockBreakdown(model, optimizer, cfg.steps_per_print)

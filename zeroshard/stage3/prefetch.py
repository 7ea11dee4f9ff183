"""The stage-3 prefetch and reuse policy, as pure functions of the recorded fetch order.

Every pass (forward, no-grad forward, backward) records the order units were fetched in, as
positions in the engine's unit list; the next pass of the same kind replays it. These
functions decide from that order and the units' states; the engine (engine.py) acts on the
answers. Units need `numel`, `persistent`, `state` and `idle` (unit.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from zeroshard.stage3.unit import RELEASED


def to_prefetch(order: Sequence[int], cursor: int, units: Sequence[Any], prefetch_numel: int,
                max_live_numel: int, current: int | None = None) -> list[int]:  # fmt: skip
    """Units to start gathering now: the next ones in `order` after `cursor` that are
    released, while gathered-but-unused elements stay within `prefetch_numel` and everything
    gathered within `max_live_numel`. `current`, the unit being fetched for use right now,
    is in use, not pending. Persistent units are always resident and never fetched, so they
    count against neither (as in DeepSpeed, whose prefetch budget counts only parameters in
    flight)."""
    live = sum(x.numel for x in units if x.state != RELEASED and not x.persistent)
    pending = sum(x.numel for i, x in enumerate(units)
                  if x.state != RELEASED and x.idle and not x.persistent and i != current)
    out: list[int] = []
    for i in order[cursor:]:
        nxt = units[i]
        if nxt.state != RELEASED or nxt.persistent or i in out:
            continue
        if pending + nxt.numel > prefetch_numel or live + nxt.numel > max_live_numel:
            break
        out.append(i)
        pending += nxt.numel
        live += nxt.numel
    return out


def backward_head(order: Sequence[int] | None, units: Sequence[Any], prefetch_numel: int
                  ) -> set[int]:  # fmt: skip
    """Units the recorded backward fetches first: the first one whatever its size (in use as
    soon as backward starts), then the next ones up to one prefetch bucket (what `to_prefetch`
    would gather ahead of it), so none is released at the end of forward only to be
    gathered again at once."""
    keep: set[int] = set()
    budget = 0
    for i in order or ():
        u = units[i]
        if i in keep or u.persistent:
            continue
        if keep and budget + u.numel > prefetch_numel:
            break
        if keep:
            budget += u.numel
        keep.add(i)
    return keep


def next_use_within(order: Sequence[int], cursor: int, index: int, units: Sequence[Any],
                    max_reuse_numel: int) -> bool | None:  # fmt: skip
    """After a use of unit `index`: True if `order` uses it again with at most
    `max_reuse_numel` elements of other units gathered in between, False if it is used again
    later than that, None if this pass does not use it again."""
    between: set[int] = set()
    numel = 0
    for i in order[cursor:]:
        if i == index:
            return numel <= max_reuse_numel
        if i not in between:
            between.add(i)
            numel += units[i].numel
    return None

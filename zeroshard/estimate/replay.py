"""The stage-3 schedule replayed on module registration order: the fallback of
`estimate/stage3.py` when the model cannot be run (no example input, or its forward fails on
the meta device).

It mirrors the engine's rules (stage3/engine.py, prefetch.py) over an assumed call order:
forward in registration order, each module once, using its own parameters (a module with
parameters of its own fetches its children's with them); backward in reverse. A module
called several times per forward, or a parameter used outside its owner (`F.linear(x,
self.embed.weight)`), breaks the assumption and the peak comes out LOW (measured: 1.9x for
a block applied 3 times per forward, 1.34x for a tied `F.linear` head); the traced run in
estimate/stage3.py has neither problem.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from zeroshard.config.schema import ZeroConfig
from zeroshard.stage3.prefetch import backward_head


def replay(model: nn.Module, units: list[Any], cfg: ZeroConfig) -> tuple[int, int]:
    """(peak gathered elements, elements all-gathered per step) of the stage-3 schedule,
    replayed on the module tree: forward in registration order, backward in reverse."""
    zo = cfg.zero_optimization
    prefetch = int(zo.stage3_prefetch_bucket_size)
    limits = (prefetch, int(zo.stage3_max_live_parameters))
    owner = {id(p): u for u in units for p in u.params}
    # (enter?, the module's non-persistent units): persistent ones are resident, never fetched
    events: list[tuple[bool, list[Any]]] = []

    def walk(m: nn.Module) -> None:
        # A module with parameters of its own fetches its children's with them: such a parent
        # computes with them itself (nn.MultiheadAttention never calls its out_proj), and the
        # engine learns them as its external units, gathered in one loop.
        folded = any(True for _ in m.parameters(recurse=False)) and m is not model
        own: list[Any] = []
        for p in m.parameters(recurse=folded):
            u = owner.get(id(p))
            if u is not None and u not in own:
                own.append(u)
        sharded = [u for u in own if not u.persistent]
        events.append((True, sharded))
        for child in () if folded else m.children():
            walk(child)
        events.append((False, sharded))

    walk(model)
    back = [(not enter, own) for enter, own in reversed(events)]
    back_seq = [u for enter, own in back if enter for u in own]
    head = head_units(back_seq, prefetch)
    peak_f, gathers_f = _pass(events, limits, int(zo.stage3_max_reuse_distance), set(), head)
    peak_b, gathers_b = _pass(back, limits, 0, {id(u) for u in head}, [], pin=True)
    return max(peak_f, peak_b), gathers_f + gathers_b


def head_units(seq: list[Any], prefetch: int) -> list[Any]:
    """The units backward starts with, kept gathered at the end of forward: the engine's
    rule (stage3/prefetch.py) on this replayed order."""
    uniq = list(dict.fromkeys(seq))
    pos = {id(u): i for i, u in enumerate(uniq)}
    return [uniq[i] for i in backward_head([pos[id(u)] for u in seq], uniq, prefetch)]


def _pass(
    events: list[tuple[bool, list[Any]]], limits: tuple[int, int], reuse: int,
    start: set[int], head: list[Any], pin: bool = False,
) -> tuple[int, int]:
    """One pass of module enter/exit events: (peak elements gathered, elements gathered).
    `pin` (backward): a unit stays gathered until its last use of the pass, when all of its
    gradients are in (a tied embedding: from the head's backward to the embedding's).
    Persistent units are resident: like the engine, they take none of the prefetch budget."""
    prefetch, max_live = limits
    seq = [u for enter, own in events if enter for u in own]
    size = {id(u): u.numel for u in seq}
    gathered: set[int] = set(start)
    users: dict[int, int] = {}
    retained: set[int] = set()
    peak = gathers = pos = 0

    def gather(i: int) -> None:
        nonlocal gathers
        if i not in gathered:
            gathered.add(i)
            gathers += size[i]

    for enter, own in events:
        if enter:
            for u in own:
                pos += 1
                retained.discard(id(u))
                pending = sum(size[i] for i in gathered  # u itself is in use, not pending
                              if not users.get(i) and i not in retained and i != id(u))
                live = sum(size[i] for i in gathered)
                for nxt in seq[pos:]:
                    i = id(nxt)
                    if i in gathered:
                        continue
                    if pending + size[i] > prefetch or live + size[i] > max_live:
                        break
                    gather(i)
                    pending += size[i]
                    live += size[i]
                gather(id(u))
            for u in own:
                users[id(u)] = users.get(id(u), 0) + 1
            peak = max(peak, sum(size[i] for i in gathered))
        else:
            for u in own:
                users[id(u)] -= 1
                if users[id(u)] == 0:
                    rest = seq[pos:]
                    if (pin and u in rest) or _reused_within(u, rest, reuse) or (
                        u not in rest and u in head
                    ):
                        retained.add(id(u))
                    else:
                        gathered.discard(id(u))
    for u in head:  # gathered at the end of forward, to overlap the loss
        gather(id(u))
    peak = max(peak, sum(size[i] for i in gathered))
    return peak, gathers


def _reused_within(u: Any, rest: list[Any], reuse: int) -> bool:
    seen: set[int] = set()
    numel = 0
    for x in rest:
        if x is u:
            return numel <= reuse
        if id(x) not in seen:
            seen.add(id(x))
            numel += x.numel
    return False

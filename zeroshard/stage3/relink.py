"""Stage 3's half of issue 8's "moved parameters" seam (guards.relink_moved does stages 0-2).

A gathered (persistent) parameter whose storage was replaced after construction (`model.to()`
copies, `p.data = ...`) no longer views its unit's full buffer, so the update would miss it:
its current values are copied into the buffer and it views the buffer again. Released
parameters are placeholders that the next gather re-points, so they need nothing. The units
are found through the registry (the optimizer's parameters), never through attributes.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import guards
from . import registry


@torch.no_grad()
def relink_moved_stage3(optimizer: Any) -> None:
    """Re-link the moved parameters of every gathered unit holding `optimizer`'s params."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    units = dict.fromkeys(u for u in map(registry.unit_of, params) if u is not None)
    for u in units:
        if u.full is None:
            continue
        changed = False
        for s in u.slots:
            p = s.param
            if p is None:
                continue
            view = u.full[s.offset : s.offset + s.numel]
            if p.data.data_ptr() == view.data_ptr() or p.numel() != s.numel:
                continue
            changed |= guards.relink(p, view, s.shape)
        if changed and u.persistent:  # the shard pieces are views of `full`: masters follow
            u.notify_rewritten()


guards.RELINKERS[3] = relink_moved_stage3

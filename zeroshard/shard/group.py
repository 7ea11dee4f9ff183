"""`ShardGroup`: what one rank updates for one (param group, dtype), at every stage.

A shard group owns
- its **shard**: this rank's pieces of the parameters (views into a flat buffer at stages 0-2,
  into the units' shards at stage 3), in shard order;
- its **gradient source**: a callable returning the averaged gradient pieces aligned with the
  shard (an all-reduced replica, a reduce-scattered shard, or a stage-3 unit's reduced shard);
- its **fp32 master**: the shard itself when the parameters are fp32 and the placement allows
  it, else a separate fp32 buffer that the update writes through to the parameters;
- its **optimizer state**, stored by a `StateCodec` in memory chosen by a `Placement`.

The stage that built it supplies the shard, the gradient source and `describe`, which says
which elements of which parameter each rank holds. The optimizer, checkpoints, accounting,
the estimator and the guards read a group only through the public members below.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from zeroshard.shard.codec import FP32, Segment, StateCodec, States
from zeroshard.shard.layout import Piece
from zeroshard.shard.placement import ON_DEVICE, GradLanding, Placement
from zeroshard.update import apply as update


@dataclass(frozen=True)
class HeldParam:
    """One parameter a shard group covers: where it sits and every rank's pieces of it."""

    param: Tensor
    shape: tuple[int, ...]  # the full parameter's shape (a stage-3 placeholder has none)
    flat_offset: int  # first element in its flat buffer (stage 3: in its unit)
    pieces: tuple[Piece, ...]


class ShardGroup:
    """One optimizer update unit on this rank (see the module docstring)."""

    def __init__(
        self,
        *,
        group: int,
        dtype: torch.dtype,
        shard: list[Tensor],
        grads: Callable[[], list[Tensor]],
        describe: Callable[[], list[HeldParam]],
        shard_numel: int,
        num_shards: int,
        codec: StateCodec = FP32,
        placement: Placement = ON_DEVICE,
        shard_index: int = 0,
    ) -> None:
        self.group = group  # the optimizer param group it belongs to
        self.dtype = dtype  # the parameters' dtype
        self.shard = shard
        self.shard_numel = shard_numel  # elements of this rank's shard, padding included
        self.num_shards = num_shards  # 1 when replicated (stage 0)
        self.shard_index = shard_index  # which rank's pieces of `held_params()` are ours
        self.placement = placement
        self.step = 0
        self.generic: torch.optim.Optimizer | None = None
        self.stored: States = {}
        self._grads = grads
        self._describe = describe
        self._decoded: States | None = None  # handed out by `state()`, encoded on `commit`
        if placement.shares_params(dtype):
            self.master_buffer: Tensor | None = None
            self.master = list(shard)  # the parameters' own shard is the fp32 master
            self.model_copies: list[Tensor] | None = None
        else:
            like = shard[0] if shard else torch.empty(0)
            self.master_buffer = placement.allocate(sum(t.numel() for t in shard), like)
            self.master = list(self.master_buffer.split([t.numel() for t in shard]))
            self.model_copies = list(shard)
            self.refresh_master()
        if isinstance(placement, GradLanding):  # it copies gradients in as they land
            placement.track_grads(self.grads())
        align = getattr(codec, "alignment", None)
        if align is not None:  # every rank checks every rank's pieces: all raise or none
            for h in self.held_params():
                a = align(math.prod(h.shape))
                bad = [q.start for q in h.pieces if q.start % a]
                if bad:
                    raise ValueError(
                        f"a parameter of shape {h.shape} has pieces starting at elements "
                        f"{bad[:3]}, not multiples of {a}, as the {codec.name!r} state codec "
                        "needs: its layout was not planned with the codec (zeroshard.Init "
                        "given another optimizer config? give it the same config)"
                    )  # fmt: skip
        bind = getattr(codec, "bind", None)  # a codec that needs to know the parameters
        self.codec: StateCodec = bind(self.segments(), self.master) if bind else codec

    # -- state ----------------------------------------------------------------------------
    def init_state(
        self, rule: str, hp: dict[str, Any], generic_cls: type[torch.optim.Optimizer] | None,
        options: dict[str, Any],
    ) -> None:  # fmt: skip
        """Fresh optimizer state for `rule` (or a torch optimizer run on the master pieces)."""
        if generic_cls is None:
            self.stored = self.codec.encode_new(update.init_state(rule, hp, self.master))
        else:
            self.generic = generic_cls([{"params": self.master, **options}])

    def state(self) -> States:
        """fp32 state pieces aligned with `master`, writable: call `commit()` after writing."""
        if self.generic is not None:
            per = [self.generic.state.get(m, {}) for m in self.master]
            out: States = {}
            for name in per[0] if per else ():
                if all(torch.is_tensor(s.get(name)) for s in per):
                    out[name] = [s[name] for s in per]
            return out
        if self._decoded is None:
            self._decoded = self.codec.decode(self.stored)
        return self._decoded

    def commit(self) -> None:
        """Store state written through `state()` and make the parameters follow the master."""
        self._store_decoded()
        self.write_params()

    def _store_decoded(self) -> None:
        """fp32 state handed out by `state()` (and maybe written) goes back to `stored`."""
        if self._decoded is not None:
            self.codec.encode(self._decoded, self.stored)
            self._decoded = None

    def piece_states(self, shard_offset: int, numel: int) -> dict[str, tuple[Tensor, int]]:
        """The stored state of one parameter piece (elements [shard_offset, +numel) of the
        shard) as (1-D view, parameter elements per entry), by stored-state name."""
        own = getattr(self.codec, "piece_states", None)
        if own is not None:
            self._store_decoded()
            return own(self.stored, shard_offset, numel)
        out = {}
        for name, ts in self.state().items():
            pos = 0
            for t in ts:
                if pos <= shard_offset and shard_offset + numel <= pos + t.numel():
                    out[name] = (t.reshape(-1)[shard_offset - pos : shard_offset - pos + numel], 1)
                    break
                pos += t.numel()
        return out

    def lazy_state(self) -> Mapping[str, list[Tensor]]:
        """`state()`, decoded on first access only."""
        return _Lazy(self.state)

    @property
    def coded(self) -> bool:
        """True when the stored state is not the fp32 working form (checkpoints save it)."""
        return hasattr(self.codec, "piece_states") and self.generic is None

    def stored_tensors(self) -> list[Tensor]:
        """Every tensor of optimizer state this group keeps between steps."""
        out = [t for ts in self.stored.values() for t in ts]
        if self.generic is not None:
            for st in self.generic.state.values():
                out += [v for v in st.values() if torch.is_tensor(v)]
        return out

    # -- the update -------------------------------------------------------------------------
    def grads(self) -> list[Tensor]:
        """This step's averaged gradient pieces, aligned with `shard`."""
        return self._grads()

    def update(
        self, rule: str, options: dict[str, Any], hp: dict[str, Any], grad_scale: float,
        backend: str,
    ) -> None:  # fmt: skip
        """One optimizer step of this group; the parameters' shard holds the result."""
        self.step += 1
        grads = self.placement.stage_grads(self.grads())
        if self.generic is not None:
            self._generic_update(options, grads, grad_scale)
            return
        # A master next to the parameters: the update kernel writes their rounded copies in
        # its own pass. A master elsewhere: the placement copies it over afterwards.
        in_pass = self.placement.shares_params(torch.float32)
        kw: dict[str, Any] = dict(
            lr=float(options["lr"]), step=self.step, hp=hp,
            grad_scale=grad_scale if grad_scale != 1.0 else None,
            model_copies=self.model_copies if in_pass else None, backend=backend,
        )  # fmt: skip
        self._decoded = None
        fused = getattr(self.codec, "update", None)
        if fused is not None:  # dequantize, update, requantize in one pass per piece
            fused(rule, self.master, grads, self.stored, **kw)
        else:
            working = self.codec.decode(self.stored)
            update.apply_update(rule, self.master, grads, working, **kw)
            self.codec.encode(working, self.stored)
        if not in_pass:
            self.write_params()

    def _generic_update(self, options: dict[str, Any], grads: list[Tensor], scale: float) -> None:
        inner = self.generic.param_groups[0]
        for k, v in options.items():
            if k != "params":
                inner[k] = v
        for m, g in zip(self.master, grads):
            m.grad = g.to(torch.float32) * scale if scale != 1.0 else g.float()
        self.generic.step()
        for m in self.master:
            m.grad = None
        self.write_params()

    @torch.no_grad()
    def write_params(self) -> None:
        """The parameters' shard takes the master's values (rounded when low precision)."""
        if self.model_copies is not None:
            self.placement.write_params(self.master, self.model_copies)

    @torch.no_grad()
    def refresh_master(self, pieces: list[int] | None = None) -> None:
        """The master takes the parameters' values (they were written from outside)."""
        if self.model_copies is None:
            return
        for i in range(len(self.master)) if pieces is None else pieces:
            self.master[i].copy_(self.model_copies[i])

    # -- the public description -----------------------------------------------------------
    def held_params(self) -> list[HeldParam]:
        """Each parameter this group covers, with every rank's pieces of it."""
        return self._describe()

    def segments(self) -> list[Segment]:
        """This rank's runs of each parameter inside the master pieces, in shard order."""
        ends, pos = [], 0
        for m in self.master:
            pos += m.numel()
            ends.append(pos)
        out = []
        for h in self.held_params():
            total = math.prod(h.shape)
            for q in h.pieces:
                if q.rank != self.shard_index:
                    continue
                i = bisect.bisect_right(ends, q.shard_offset)
                first = ends[i - 1] if i else 0
                if q.shard_offset + q.numel > ends[i]:
                    raise ValueError(f"a piece of a parameter of shape {h.shape} spans two "
                                     "master pieces")  # fmt: skip
                out.append(Segment(i, q.shard_offset - first, q.numel, q.start, total))
        return sorted(out, key=lambda s: (s.piece, s.offset))


class _Lazy(Mapping):
    """A mapping that calls `make` on first access (a codec's decode is not free)."""

    def __init__(self, make: Callable[[], States]) -> None:
        self._make = make
        self._value: States | None = None

    def _get(self) -> States:
        if self._value is None:
            self._value = self._make()
        return self._value

    def __getitem__(self, key: str) -> list[Tensor]:
        return self._get()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())

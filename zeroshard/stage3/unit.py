"""The stage-3 sharded unit: one module's parameters of one dtype, kept as 1/N between uses.

A unit lays its parameters out like `FlatParams` (one padded flat range, cut into buckets of
at most `bucket_numel` elements; rank r owns chunk r of every bucket), but it never keeps the
flat buffer between uses. It holds only this rank's chunks, contiguous in `shard`:

- gathered: `full` (the whole flat buffer) is allocated, every bucket is all-gathered into
  it, and each parameter's `.data` is a view of it, so the module runs unchanged;
- released: `full` is dropped; each parameter's `.data` is a one-element placeholder of its
  full shape (shapes.py), so the only bytes left are the shard (and the grad/state shards).

Gradients take the same path backwards: each parameter's `.grad` is added into a full-size
flat gradient buffer (in the reduce dtype), which is reduce-scattered bucket by bucket
straight into this rank's gradient shard and freed.

A persistent unit (smaller than `stage3_param_persistence_threshold`) keeps `full` for good;
its shard pieces are views of it, and the optimizer all-gathers it after each update.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

from zeroshard.comm.collectives import Comm
from zeroshard.shard.layout import BucketPlan, plan_buckets
from zeroshard.stage3 import registry, shapes
from zeroshard.stage3.unit_parts import (
    GATHERED,
    GATHERING,
    RELEASED,
    GatherSource,
    GatherTracker,
    UnitSlot,
    UnitState,
)
from zeroshard.stage3.zeropp import OFF, ZeroPP

__all__ = ["ShardedUnit", "GatherTracker", "GatherSource", "UnitSlot", "UnitState", "RELEASED",
           "GATHERING", "GATHERED"]


class ShardedUnit:
    """Parameters of one module and one dtype, sharded across the ranks of `comm`.

    The parameters must hold their full values when the unit is built (all ranks identical);
    afterwards `registry.unit_of(param)` finds this unit.
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        comm: Comm,
        bucket_numel: int,
        *,
        name: str = "",
        persistent: bool = False,
        tracker: GatherTracker | None = None,
        align: Callable[[int], int] | None = None,
    ) -> None:
        if not params:
            raise ValueError("a sharded unit needs at least one parameter")
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1 or len({p.device for p in params}) != 1:
            raise ValueError(f"unit {name!r}: one unit holds one dtype and device, got {dtypes}")
        self.name = name
        self.comm = comm
        self.dtype = params[0].dtype
        self.device = params[0].device
        self.persistent = persistent
        self.tracker = tracker or GatherTracker()
        self.num_shards, self.rank = comm.world_size, comm.rank
        self._plan(params, max(int(bucket_numel), 1), align)
        self.trainable = any(p.requires_grad for p in params)

        self.state = RELEASED
        self.full: Tensor | None = None
        self._works: list = []
        self.shard_on_host = False  # offload_param: the shard lives in host memory
        self._staging: Tensor | None = None  # device copy of a host shard, while gathering
        self._shared: GatherSource | None = None  # a coalesced gather to take its part from
        # Only this class changes these three (through the methods below).
        self._users = 0  # forward calls (and GatheredParameters) using the unit right now
        self._pinned = False  # gathered for backward, until its gradients are in
        self._retained = False  # kept gathered after use: needed again soon (reuse distance)
        self.grad_full: Tensor | None = None
        self.grad_shard: Tensor | None = None
        self.fired: set[int] = set()
        self.wrote_grad = False  # grad shard already holds reduced gradient this step
        self._listeners: list[weakref.WeakMethod] = []  # told when user code rewrote the shard
        self.zpp: ZeroPP = OFF  # ZeRO++: what the gathers send, where they come from (engine)
        self.secondary: Tensor | None = None  # hpZ: this rank's 1/P of the gathered buffer
        self.exact = True  # `full` holds the shards' exact values (no quantized gather)
        self.secondary_exact = True  # the secondary was cut from an exact gather
        self._from_secondary = False  # the gather in progress reads the secondary shards
        self._build_shard(params)
        for p in params:
            registry.set_unit(p, self)

    # -- layout ---------------------------------------------------------------------------
    def _plan(self, params: list[nn.Parameter], bucket_numel: int,
              align: Callable[[int], int] | None) -> None:  # fmt: skip
        # `align`: the optimizer state codec's per-parameter alignment (layout.plan_buckets)
        self.plan: BucketPlan = plan_buckets([p.numel() for p in params], self.num_shards,
                                             bucket_numel, align)  # fmt: skip
        self.slots = [
            UnitSlot(weakref.ref(params[s.index]), s.offset, s.numel, params[s.index].shape,
                     s.bucket)
            for s in self.plan.slots
        ]  # fmt: skip
        self.buckets = list(self.plan.buckets)
        self.numel = self.plan.numel
        self.shard_numel = self.plan.shard_numel
        self.param_numel = self.plan.param_numel
        self.index = {id(s.param): i for i, s in enumerate(self.slots)}

    # -- life cycle: who uses the full parameters ------------------------------------------------
    @property
    def users(self) -> int:
        return self._users

    @property
    def pinned(self) -> bool:
        return self._pinned

    @property
    def retained(self) -> bool:
        return self._retained

    @property
    def idle(self) -> bool:
        """Gathered (or gathering) for nobody yet: a prefetch."""
        return self._users == 0 and not self._pinned and not self._retained

    def acquire(self) -> None:
        """One more user of the full parameters (the caller gathered them)."""
        self._users += 1

    def drop_use(self) -> None:
        """One user fewer; the caller decides whether to release."""
        if self._users == 0:
            raise RuntimeError(f"unit {self.name!r}: drop_use() without a matching acquire()")
        self._users -= 1

    def reset_uses(self) -> None:
        """Nobody uses the unit any more (a forward that raised, a recomputation cut short)."""
        self._users = 0

    def pin(self) -> None:
        """Keep gathered for backward until the gradients are in."""
        self._pinned = True

    def unpin(self) -> None:
        self._pinned = False

    def retain(self) -> None:
        """Keep gathered after use: needed again soon."""
        self._retained = True

    def unretain(self) -> None:
        self._retained = False

    def adopt(self, comm: Comm, tracker: GatherTracker) -> None:
        """A unit built under `zeroshard.Init` joins a model's engine."""
        self.comm, self.tracker = comm, tracker

    def add_listener(self, method) -> None:
        """`method(unit)` (a bound method, held weakly) runs after user code rewrote the shard."""
        self._listeners.append(weakref.WeakMethod(method))

    def notify_rewritten(self) -> None:
        for ref in self._listeners:
            method = ref()
            if method is not None:
                method(self)

    @property
    def params(self) -> list[nn.Parameter]:
        return [s.param for s in self.slots]

    @property
    def full_bytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    def chunk_overlaps(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """(bucket, begin, end) in chunk coordinates of this rank's chunks inside flat [lo, hi)."""
        return self.plan.overlaps(lo, hi, self.rank)

    @torch.no_grad()
    def _build_shard(self, params: list[nn.Parameter]) -> None:
        if self.persistent:
            self.full = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
            for s in self.slots:
                self.full[s.offset : s.offset + s.numel].copy_(s.param.detach().reshape(-1))
            self.shard = None
            self.shard_pieces = [self.full[slice(*b.chunk_range(self.rank))] for b in self.buckets]
            self._point_params()
            self.state = GATHERED
            return
        # Copy only this rank's ranges out of each parameter: no full flat buffer is built.
        self.shard = torch.zeros(self.shard_numel, dtype=self.dtype, device=self.device)
        self.shard_pieces = [
            self.shard[b.shard_offset : b.shard_offset + b.chunk] for b in self.buckets
        ]
        for s in self.slots:
            src = s.param.detach().reshape(-1)
            for bi, a, z in self.chunk_overlaps(s.offset, s.offset + s.numel):
                c0 = self.buckets[bi].chunk_range(self.rank)[0]
                self.shard_pieces[bi][a:z].copy_(src[c0 + a - s.offset : c0 + z - s.offset])
        self._placeholders()

    def _placeholders(self) -> None:
        for s in self.slots:  # full shape, one element: `p.dim()`, `p.numel()` stay true
            s.param.data = shapes.placeholder(s.shape, self.dtype, self.device)

    def _point_params(self) -> None:
        for s in self.slots:
            s.param.data = self.full[s.offset : s.offset + s.numel].view(s.shape)

    # -- gather / release -------------------------------------------------------------------
    def gather(self, exact: bool = False) -> None:
        """Start all-gathering the full parameters (one collective per bucket, async): from
        the hpZ secondary shards when there are some, else from the world (qwZ-quantized
        unless `exact`: state dicts and GatheredParameters read and write the true values)."""
        if self.state != RELEASED:
            if exact and not self.exact:
                self._regather_exact()
            return
        self.full = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        self._from_secondary = self.secondary is not None and not exact
        if self._from_secondary:
            assert self.zpp.hpz is not None and self.secondary is not None
            self._works = [self.zpp.hpz.all_gather(self.full, self.secondary, async_op=True)]
            self.exact = self.secondary_exact
        else:
            codec = None if exact else self.zpp.codec_for(self.trainable)
            self._works = [
                self.comm.all_gather(self.full[b.start : b.start + b.numel], piece,
                                     async_op=True, codec=codec)  # fmt: skip
                for b, piece in zip(self.buckets, self.gather_sources())
            ]
            self.exact = codec is None
        self.tracker.add(self.full_bytes)
        self.state = GATHERING

    def _regather_exact(self) -> None:
        if self._users > 0 or self._pinned:
            raise RuntimeError(f"unit {self.name!r}: the exact parameters were asked for while "
                               "its quantized gather (zero_quantized_weights) is in use, inside "
                               "forward or backward; read them outside the step")  # fmt: skip
        self._drop_full()
        self.gather(exact=True)

    def drop_secondary(self) -> None:
        """The parameters changed (an update, a load, a rewrite): hpZ's copy is stale."""
        self.secondary = None

    def gather_sources(self) -> list[Tensor]:
        """What each bucket's all-gather sends: the shard pieces, or, when the shard lives in
        host memory, their copy in a device staging buffer (alive until the gather ends)."""
        if not self.shard_on_host:
            return self.shard_pieces
        assert self.shard is not None
        staging = torch.empty(self.shard_numel, dtype=self.dtype, device=self.device)
        staging.copy_(self.shard, non_blocking=staging.is_cuda)
        self._staging = staging
        return [staging[b.shard_offset : b.shard_offset + b.chunk] for b in self.buckets]

    @torch.no_grad()
    def offload_shard(self, pin_memory: bool) -> None:
        """Keep the parameter shard in host memory (`offload_param`), pinned when the
        parameters are on CUDA; gathers go through a device staging buffer. Call before the
        optimizer takes views of the shard. Persistent units keep their full parameters."""
        if self.persistent or self.shard is None or self.shard_on_host:
            return
        pin = pin_memory and self.device.type == "cuda"
        host = torch.empty(self.shard_numel, dtype=self.dtype, device="cpu", pin_memory=pin)
        host.copy_(self.shard)
        self.shard = host
        self.shard_pieces = [host[b.shard_offset : b.shard_offset + b.chunk] for b in self.buckets]
        self.shard_on_host = True

    def gather_shared(self, shared: GatherSource) -> None:
        """Gathered by a collective shared with other units: `shared.fill(self, full)` (a
        `coalesce.SharedGather`) copies this unit's part into its full buffer on `wait()`."""
        if self.state != RELEASED:
            raise RuntimeError(f"unit {self.name!r}: shared gather of a {self.state.value} unit")
        self._shared = shared
        self._from_secondary = shared.from_secondary
        self.exact = shared.exact
        self.state = GATHERING

    def wait(self) -> None:
        """Finish the gather and point the parameters at the full buffer."""
        if self.state == RELEASED:
            self.gather()
        if self.state == GATHERING:
            if self._shared is not None:
                shared, self._shared = self._shared, None
                self.full = torch.empty(self.numel, dtype=self.dtype, device=self.device)
                self.tracker.add(self.full_bytes)
                shared.fill(self, self.full)
            for w in self._works:
                w.wait()
            self._works = []
            self._staging = None
            self._point_params()
            self.state = GATHERED

    def release(self) -> None:
        """Drop the full parameters; releasing a unit still in use or pinned is a bug."""
        if self._users > 0 or self._pinned:
            raise RuntimeError(
                f"unit {self.name!r}: release() while in use ({self._users} users, "
                f"pinned={self._pinned})"
            )
        self._drop_full()

    def release_if_unused(self) -> bool:
        """Release unless in use, pinned for backward or persistent; True if released."""
        if self.persistent or self.state == RELEASED or self._users > 0 or self._pinned:
            return False
        self._drop_full()
        return True

    def discard(self) -> None:
        """Release whatever the users (a forward that raised): pending gathers are dropped."""
        self._users = 0
        self._pinned = False
        self._drop_full(wait=False)

    def _drop_full(self, wait: bool = True) -> None:
        if self.persistent or self.state == RELEASED:
            return
        if self.state == GATHERING and wait:
            self.wait()
        if self._shared is not None:  # dropped before it took its part
            self._shared.done(self)
            self._shared = None
        self._works = []
        self._staging = None
        if self.state == GATHERED and not self._from_secondary and self.secondary is None:
            # hpZ: released during a grad-enabled forward, the unit will be gathered again
            # before the update; a unit kept gathered into backward never needs a copy
            self.secondary = self.zpp.secondary_of(self.full)
            self.secondary_exact = self.exact
        self.exact = True
        self._placeholders()
        if self.full is not None:
            self.tracker.sub(self.full_bytes)
        self.full = None
        self.state = RELEASED
        self._pinned = False
        self._retained = False

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy this rank's chunks of the (modified) full parameters into the shard."""
        if self.persistent or self.full is None:
            return
        if not self.exact:
            raise RuntimeError(f"unit {self.name!r}: writing back quantized parameters "
                               "(zero_quantized_weights) would lose the exact shard; gather "
                               "with exact=True first")  # fmt: skip
        self.drop_secondary()
        for s in self.slots:  # the params may have been given new tensors by user code
            view = self.full[s.offset : s.offset + s.numel]
            if s.param.data.data_ptr() != view.data_ptr() and s.param.numel() == s.numel:
                view.copy_(s.param.data.reshape(-1))
        for b, piece in zip(self.buckets, self.shard_pieces):
            piece.copy_(self.full[slice(*b.chunk_range(self.rank))])
        self._point_params()

    # -- gradients --------------------------------------------------------------------------
    def zero_grad(self) -> None:
        """Forget this step's gradients (the shard stays allocated, zeroed)."""
        if self.grad_shard is not None:
            self.grad_shard.zero_()
        self.wrote_grad = False
        self.grad_full = None
        self.fired.clear()

    def ensure_grad_shard(self, dtype: torch.dtype) -> None:
        if self.trainable and self.grad_shard is None:
            self.grad_shard = torch.zeros(self.shard_numel, dtype=dtype, device=self.device)

    def grad_shard_pieces(self) -> list[Tensor]:
        assert self.grad_shard is not None
        return [self.grad_shard[b.shard_offset : b.shard_offset + b.chunk] for b in self.buckets]

    @torch.no_grad()
    def accumulate(self, param: nn.Parameter) -> bool:
        """Move `param.grad` into the flat gradient buffer; True once every trainable
        parameter of the unit has reported in this backward."""
        i = self.index[id(param)]
        s = self.slots[i]
        if param.grad is None:
            return False
        if self.grad_full is None:
            assert self.grad_shard is not None
            dtype = self.grad_shard.dtype
            self.grad_full = torch.zeros(self.numel, dtype=dtype, device=self.device)
        self.grad_full[s.offset : s.offset + s.numel].add_(param.grad.reshape(-1))
        param.grad = None
        self.fired.add(i)
        return len(self.fired) == sum(1 for s in self.slots if s.param.requires_grad)

    @property
    def grad_dtype(self) -> torch.dtype | None:
        return None if self.grad_shard is None else self.grad_shard.dtype

    def take_grads(self) -> tuple[Tensor, bool]:
        """Hand the flat gradient buffer to a coalesced reduction (coalesce.py); also says
        whether it is this step's first reduction (its result is copied, not added)."""
        assert self.grad_full is not None
        grad, first = self.grad_full, not self.wrote_grad
        self.grad_full = None
        self.wrote_grad = True
        self.fired.clear()
        return grad, first

    @torch.no_grad()
    def land_grads(self, reduced: Tensor, first: bool) -> None:
        """This unit's reduced gradient shard from a coalesced reduction."""
        assert self.grad_shard is not None
        if first:
            self.grad_shard.copy_(reduced)
        else:
            self.grad_shard.add_(reduced)

    def reduce_grads(self) -> list[tuple[object, Tensor, Tensor | None]]:
        """Reduce-scatter the flat gradient buffer into the gradient shard (async); returns
        (work, buffer kept alive, temporary to add into the shard after the wait)."""
        if self.grad_full is None:
            return []
        assert self.grad_shard is not None
        out = []
        for b, piece in zip(self.buckets, self.grad_shard_pieces()):
            full = self.grad_full[b.start : b.start + b.numel]
            dst = torch.empty_like(piece) if self.wrote_grad else piece
            work = (self.zpp.grads or self.comm).reduce_scatter(dst, full, op="avg",
                                                                async_op=True)  # fmt: skip
            out.append((work, full, None if dst is piece else (dst, piece)))
        self.wrote_grad = True
        self.grad_full = None
        self.fired.clear()
        return out

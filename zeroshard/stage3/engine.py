"""When stage-3 units are gathered, released and reduced: module hooks and prefetching.

- Forward: before a module runs, the units of its parameters (its own, tied ones owned by
  another module, and "external" ones it was seen to use) are gathered; after it returns
  they are released unless another running module still uses them. The root's pre-hook
  opens a forward and its post-hook (`always_call`) closes it, so an exception leaves
  nothing gathered; removing the engine removes its hooks and nothing else.
- Backward: a hook on each module output gathers the module's units again when the output's
  gradient arrives, pinned until every parameter's gradient is in; then the unit's flat
  gradient is reduce-scattered into the owner's shard and the full tensors are freed. A
  callback at the end of backward reduces whatever is left (unused parameters) and releases.
- Prefetch: every pass records the order units were fetched in; the next pass of the same
  kind (forward, no-grad forward, backward) issues the all-gathers of the units after the
  current one, up to `prefetch_numel` elements not yet in use, so they overlap compute.
  Those units share one all-gather (coalesce.py), and units whose gradients are complete
  share one reduce-scatter up to `reduce_numel` elements: on a latency-bound model the
  number of collectives, not their bytes, sets the step time.
- Reuse: after a forward use a unit stays gathered if the recorded order needs it again
  within `stage3_max_reuse_distance` elements of other gathers (a tied embedding, a block
  reused in a loop), or if backward starts with it (the last layers: gathered at the end of
  forward, needed first by backward). 0 releases every unit right after each use.
- A parameter used outside its owner's forward (`F.linear(x, self.embed.weight)`, or an
  `out_proj` that `nn.MultiheadAttention` never calls) is caught by a TorchFunctionMode
  during forward: its unit is gathered on the spot and the running module learns it as a
  dependency, fetched in its pre-forward from then on (and in any recomputation).

Collectives are issued in execution order, identical on every rank for the same model and
control flow (as FSDP and DeepSpeed assume).
"""

from __future__ import annotations

import functools
import sys
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from zeroshard import guards
from zeroshard.comm.collectives import Comm
from zeroshard.comm.inflight import MAX_IN_FLIGHT, InFlight
from zeroshard.stage3 import shapes
from zeroshard.stage3.coalesce import GradBatcher, gather_coalesced
from zeroshard.stage3.grouping import fetchers
from zeroshard.stage3.prefetch import backward_head, next_use_within, to_prefetch
from zeroshard.stage3.unit import GATHERED, RELEASED, GatherTracker, ShardedUnit
from zeroshard.stage3.zeropp import ZeroPP

# Metadata reads need no parameter values: a released placeholder has the full shape.
_METADATA = shapes.METADATA_READS


class TrainingState(Enum):
    """Where the engine is in a training step (backward starts at the first output gradient
    and ends with autograd's end-of-backward callback)."""

    IDLE = "idle"
    FORWARD = "forward"
    BACKWARD = "backward"


class ExternalParamMode(TorchFunctionMode):
    """Gathers a released sharded parameter the moment any torch function receives it."""

    def __init__(self, engine: Stage3Engine) -> None:
        super().__init__()
        self.engine = engine

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.engine.busy or func in _METADATA:  # not a use of the values
            return func(*args, **kwargs)
        units = self.engine.param_units
        for a in (*args, *kwargs.values()):
            if isinstance(a, (list, tuple)):
                for x in a:
                    u = units.get(id(x))
                    if u is not None and u.state != GATHERED:
                        self.engine.fetch_external(u)
            else:
                u = units.get(id(a))
                if u is not None and u.state != GATHERED:
                    self.engine.fetch_external(u)
        return func(*args, **kwargs)


class _Hook:
    """An engine hook on a user's module. Deep-copying the module would copy the engine
    with it (its units, its process group), so a copy is refused with the way to do it."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> _Hook:
        raise RuntimeError(
            "copy.deepcopy of a stage-3 model: its parameters are sharded across ranks. "
            "Build a fresh model and load zeroshard.stage3.full_state_dict(model) into it "
            "(or deepcopy before zeroshard.initialize)"
        )


class Stage3Engine:
    """Owns the units of one model and the hooks that gather, release and reduce them."""

    def __init__(
        self,
        model: nn.Module,
        units: list[ShardedUnit],
        comm: Comm,
        reduce_dtype: torch.dtype,
        *,
        prefetch_numel: int,
        max_live_numel: int,
        max_reuse_numel: int = 0,
        tracker: GatherTracker,
        reduce_numel: int = 0,
        zeropp: ZeroPP | None = None,
    ) -> None:
        self.model = model
        self.units = units
        self.comm = comm
        self.reduce_dtype = reduce_dtype
        self.prefetch_numel = int(prefetch_numel)
        self.max_live_numel = int(max_live_numel)
        self.max_reuse_numel = int(max_reuse_numel)
        self.reduce_numel = int(reduce_numel)  # most elements one coalesced collective covers
        self.tracker = tracker
        self._index = {id(u): i for i, u in enumerate(units)}  # unit -> position
        self.state_dict_rank0_only = False  # state_dict.py: full tensors on rank 0 only
        self.param_units: dict[int, ShardedUnit] = {}
        self.zpp = zeropp or ZeroPP()  # ZeRO++ (stage3/zeropp.py); plain stage 3 by default
        self.zpp.collect = False  # hpZ keeps secondary shards only in grad-enabled forwards
        for u in units:
            u.zpp = self.zpp
            u.ensure_grad_shard(reduce_dtype)
            for p in u.params:
                self.param_units[id(p)] = u
        # units fetched by each module: its registered params' units, then learned externals
        self.module_units: dict[nn.Module, list[ShardedUnit]] = {}
        for m in model.modules():
            own = []
            for p in m.parameters(recurse=False):
                u = self.param_units.get(id(p))
                if u is not None and u not in own:
                    own.append(u)
            self.module_units[m] = own  # what a module's state_dict reads
        # what a module's forward gathers: a block's unit is gathered by the block itself
        self.fetched: dict[nn.Module, list[ShardedUnit]] = fetchers(model, units,
                                                                    self.param_units)
        self.external: dict[nn.Module, list[ShardedUnit]] = {}
        self._frames: list[tuple[nn.Module, list[ShardedUnit]]] = []
        self._mode: ExternalParamMode | None = None
        self.training_state = TrainingState.IDLE
        self.busy = False  # inside a hook: torch calls made here are not parameter uses
        self._orders: dict[str, list[int]] = {}  # last pass's fetch order, per pass kind
        self._recording: list[int] = []
        self._pass = ""
        self._cursor = 0
        self.queue = InFlight()  # reduce-scatters in flight (shared with stages 0-2)
        self.batcher = GradBatcher(comm, self.queue, reduce_numel, self.zpp)
        self._handles: list = []
        self._root_depth = 0
        self._ambient_error: BaseException | None = None
        self._install()

    # -- installation -----------------------------------------------------------------------
    def _install(self) -> None:
        for m in self.model.modules():
            if m is self.model:
                continue
            self._handles.append(m.register_forward_pre_hook(_Hook(self._pre_forward)))
            self._handles.append(m.register_forward_hook(_Hook(self._post_forward)))
        for u in self.units:
            for p in u.params:
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
        # The root's own hooks open and close every forward: first of its pre-hooks, and a
        # post-hook that also runs when forward raises, so nothing stays gathered.
        self._handles.append(self.model.register_forward_pre_hook(
            _Hook(self._root_pre_forward), with_kwargs=True, prepend=True))
        self._handles.append(self.model.register_forward_hook(
            _Hook(self._root_post_forward), with_kwargs=True, always_call=True))

    def remove(self) -> None:
        """Take every hook off the model: it is left exactly as it was given."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def units_of(self, m: nn.Module) -> list[ShardedUnit]:
        ext = self.external.get(m)
        return self.fetched.get(m, []) + ext if ext else self.fetched.get(m, [])

    # -- forward ----------------------------------------------------------------------------
    def _root_pre_forward(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        self._root_depth += 1
        if self._root_depth > 1:  # the root re-entered inside its own forward
            return
        guards.check_ddp_forward()  # DDP around a stage-3 model is an error
        if self.training_state is TrainingState.BACKWARD:  # the last backward raised
            for u in self.units:
                u.unpin()
        self.training_state = TrainingState.FORWARD
        self._start_pass("forward" if torch.is_grad_enabled() else "forward_nograd")
        self.zpp.collect = torch.is_grad_enabled()
        # an exception already being handled around this forward is not this forward's
        self._ambient_error = sys.exc_info()[1]
        self._mode = ExternalParamMode(self)
        self._mode.__enter__()
        self._pre_forward(self.model, args)

    def _root_post_forward(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        self._root_depth -= 1
        if self._root_depth > 0:
            return None
        error = sys.exc_info()[1]
        ok = error is None or error is self._ambient_error
        try:
            if ok:
                output = self._post_forward(self.model, args, output)
        finally:
            mode, self._mode = self._mode, None
            if mode is not None:
                mode.__exit__(None, None, None)
            if self.training_state is TrainingState.FORWARD:
                self.training_state = TrainingState.IDLE
            if ok:
                self._finish_forward()
                self._end_pass()
            else:  # leave nothing gathered and no stale frames; pending gathers are dropped
                self._frames.clear()
                for u in self.units:
                    if not u.pinned:
                        u.discard()
                self._recording = []
                self._pass = ""
            self.zpp.collect = False  # releases after this forward keep no hpZ copy
        return output if ok else None

    def _pre_forward(self, module: nn.Module, args: Any) -> None:
        units = self.units_of(module)
        self.busy = True
        try:
            for u in units:
                self.fetch(u)
        finally:
            self.busy = False
        for u in units:
            u.acquire()
        self._frames.append((module, list(units)))

    def _post_forward(self, module: nn.Module, args: Any, output: Any) -> Any:
        frame_module, units = self._frames.pop() if self._frames else (module, [])
        self.busy = True
        try:
            for u in units:
                u.drop_use()
                self._release_or_retain(u)
        finally:
            self.busy = False
        if torch.is_grad_enabled() and (units or module is self.model):
            # the root's hook also opens every backward (and queues its end-of-backward)
            hook = functools.partial(self._pre_backward, module)
            for t in tree_flatten(output)[0]:
                if isinstance(t, Tensor) and t.requires_grad:
                    t.register_hook(hook)
        return output

    def fetch_external(self, u: ShardedUnit) -> None:
        """A released parameter reached a torch function: gather it for the running module
        and remember that the module needs it."""
        module = self._frames[-1][0] if self._frames else self.model
        self.external.setdefault(module, [])
        if u not in self.external[module] and u not in self.fetched.get(module, []):
            self.external[module].append(u)
        self.busy = True
        try:
            self.fetch(u)
        finally:
            self.busy = False
        if self._frames:
            u.acquire()
            self._frames[-1][1].append(u)

    def _release_or_retain(self, u: ShardedUnit) -> None:
        """After a forward use: keep `u` if the recorded order uses it again within
        `max_reuse_numel` elements of other gathers (a tied embedding, a reused block), or if
        this was its last forward use and backward starts with it (the last layers)."""
        if u.users > 0 or u.pinned or u.persistent or u.state == RELEASED:
            return
        order = self._orders.get(self._pass)
        if order:
            index = self._index[id(u)]
            again = next_use_within(order, self._cursor, index, self.units, self.max_reuse_numel)
            if again or (again is None and index in self._backward_head()):
                u.retain()
                return
        u.release_if_unused()

    def _backward_head(self) -> set[int]:
        """Units the recorded backward starts with (only after a forward that will be
        differentiated)."""
        order = self._orders.get("backward") if self._pass == "forward" else None
        return backward_head(order, self.units, self.prefetch_numel)

    def _finish_forward(self) -> None:
        """End of the root forward: release what is left (prefetched for a module that was
        skipped, retained for a reuse that did not come), except the units backward starts
        with, whose missing gathers are started now to overlap the loss computation."""
        keep = self._backward_head()
        self.busy = True
        try:
            head = []
            for u in self.units:
                if self._index[id(u)] in keep:
                    u.unretain()  # now an ordinary prefetch for backward
                    head.append(u)
                elif u.users == 0 and not u.pinned:
                    u.release_if_unused()
            gather_coalesced(head, self.comm, self.tracker, self.prefetch_numel, self.zpp)
        finally:
            self.busy = False

    # -- fetching and prefetching -------------------------------------------------------------
    def _start_pass(self, kind: str) -> None:
        self._pass = kind
        self._recording = []
        self._cursor = 0

    def _end_pass(self) -> None:
        if self._pass:
            self._orders[self._pass] = self._recording
        self._recording = []
        self._pass = ""

    def fetch(self, u: ShardedUnit) -> None:
        """Make `u` gathered now, and start the all-gathers of the units expected next."""
        if u.persistent:
            return
        u.unretain()
        index = self._index[id(u)]
        self._recording.append(index)
        u.gather()  # its own collective first: issued before, it is not queued behind others
        order = self._orders.get(self._pass)
        if order:
            try:
                self._cursor = order.index(index, self._cursor) + 1
            except ValueError:
                pass
            self._prefetch(order, index)
        u.wait()

    def _prefetch(self, order: list[int], current: int) -> None:
        ahead = to_prefetch(order, self._cursor, self.units, self.prefetch_numel,
                            self.max_live_numel, current)  # fmt: skip
        gather_coalesced([self.units[i] for i in ahead], self.comm, self.tracker,
                         self.prefetch_numel, self.zpp)  # fmt: skip

    # -- backward -------------------------------------------------------------------------------
    def _pre_backward(self, module: nn.Module, grad: Tensor) -> None:
        if self.training_state is not TrainingState.BACKWARD:
            self.training_state = TrainingState.BACKWARD
            self._start_pass("backward")
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
        for u in self.units_of(module):
            if u.persistent:
                continue
            self.fetch(u)
            u.pin()

    def _on_grad(self, param: nn.Parameter) -> None:
        u = self.param_units[id(param)]
        if u.accumulate(param):
            self._launch_reduce(u)
            u.unpin()
            u.release_if_unused()

    def _launch_reduce(self, u: ShardedUnit) -> None:
        self.batcher.add(u)
        self.queue.wait_below(MAX_IN_FLIGHT * max(len(u.buckets), 1))

    def _end_backward(self) -> None:
        """Runs once at the end of every backward: reduce leftovers, release everything."""
        self.finish_reduction()
        if self.training_state is not TrainingState.FORWARD:
            # A recomputation inside backward (non-reentrant checkpoint) may stop early,
            # skipping its post-forward hooks: nothing outside a forward is in use now.
            self._frames.clear()
            for u in self.units:
                u.reset_uses()
        for u in self.units:
            u.unpin()
            if u.users == 0:
                u.release_if_unused()
        self.training_state = TrainingState.IDLE
        self._end_pass()

    def finish_reduction(self) -> None:
        """Reduce every gradient not reduced yet and wait for all reductions."""
        for u in self.units:
            if u.grad_full is not None and u not in self.batcher.pending:
                self.batcher.add(u)
        self.batcher.flush()
        self.queue.drain()

    # -- what the optimizer reads ------------------------------------------------------------------
    def zero_grad(self) -> None:
        for u in self.units:
            u.zero_grad()

    def params_changed(self) -> None:
        """After an update or a load: hpZ's secondary shards hold the old values."""
        for u in self.units:
            u.drop_secondary()

    def secondary_tensors(self) -> list[Tensor]:
        """hpZ's secondary shards held now (counted as `params`, and as `hpz_secondary`)."""
        return [u.secondary for u in self.units if u.secondary is not None]

    def held_tensors(self) -> dict[str, list[Tensor]]:
        params: list[Tensor] = self.secondary_tensors()
        for u in self.units:
            params += [t for t in (u.shard, u.full) if t is not None]
        grads = [u.grad_shard for u in self.units if u.grad_shard is not None]
        buffers = [u.grad_full for u in self.units if u.grad_full is not None]
        buffers += self.queue.held_tensors()
        return {"params": params, "grads": grads, "comm_buffers": buffers}

    def gathered_units(self) -> list[ShardedUnit]:
        return [u for u in self.units if u.state != RELEASED and not u.persistent]


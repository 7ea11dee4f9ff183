"""Stages 1-2: the updated shards' all-gather, finished behind the next forward.

After the update each rank holds new values only in its own chunks of the flat buffers, and
the parameters are whole again once every chunk is all-gathered. Waiting for that at the end
of `step()` leaves the whole all-gather in the open (2 gloo ranks, a 4.2M-parameter GPT:
about 9 ms of a 180 ms step, where DDP's update is 5 ms). With `overlap_param_gather` (the
name Megatron-LM's distributed optimizer uses for the same thing) `step()` launches one
all-gather per bucket, in layout order, and returns; a forward pre-hook then waits for the
buckets holding a module's parameters just before that module runs (a module with
parameters of its own waits for its children's as well: `nn.MultiheadAttention` computes
with `out_proj.weight` without calling `out_proj`), so the rest of the gather overlaps the
forward of the modules before it.

Everything still in flight is waited for before anything else touches the flat buffers:
the next step, `state_dict()`/`load_state_dict()`, a checkpoint, the model's own
`state_dict()` (a state-dict pre-hook on the model, which is why the drop-in optimizer needs
`model=` for this), and `ZeroOptimizer.finish_param_gather()`.
A parameter read outside any forward before that (an EMA of the weights, a norm logged right
after `step()`) would see other ranks' chunks still old: call `finish_param_gather()` first.
That is why it is off by default.

The pre-hook is torch's global module forward pre-hook, registered only while gathers are
pending and removed with the last wait. A compiled forward runs no per-module hooks: under
`torch.compile(model)` the wrapper's own call finishes the whole gather first, and after
`model.compile()` (in place) `step()` finishes it itself, so compiled models train right,
without the overlap.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook

from zeroshard.comm.collectives import Comm
from zeroshard.shard.flat_buffer import FlatParams


class DeferredParamGather:
    """All-gathers of the flat buffers' buckets, each waited for by the first module that
    reads a parameter in it (or by `finish()`)."""

    def __init__(self, comm: Comm, model: nn.Module) -> None:
        self.comm = comm
        self.model = model
        self._flats: list[FlatParams] = []
        self._bucket_of: dict[int, int] = {}  # id(param) -> index of its bucket's gather
        self._works: list[Any] = []  # per bucket, None once waited for
        self._left = 0  # buckets not waited for yet
        self._handle: Any = None
        # model.state_dict() (a checkpoint right after step()) returns the gathered values
        self.state_dict_hook = model.register_state_dict_pre_hook(_finisher(weakref.ref(self)))

    @property
    def pending(self) -> bool:
        return self._left > 0

    def add(self, flat: FlatParams) -> None:
        """Gather `flat` too; its parameters map to their buckets' gathers once, here."""
        first = sum(len(f.buckets) for f in self._flats)
        self._flats.append(flat)
        for slot in flat.slots:  # a bucket boundary never cuts a parameter
            self._bucket_of[id(slot.param)] = first + slot.bucket

    def launch(self) -> None:
        """Start every bucket's all-gather (each rank's own chunk into the full buffer)."""
        self.finish()
        self._works = [work for flat in self._flats for _, work in bucket_gathers(self.comm, flat)]
        self._left = len(self._works)
        if getattr(self.model, "_compiled_call_impl", None) is not None:
            # model.compile() (in place): its compiled forward runs no per-module hooks and
            # nothing wraps it, so the gather is finished here, as without the option
            self.finish()
        elif self._left:
            self._handle = register_module_forward_pre_hook(self._before_forward)

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        bucket_of = self._bucket_of
        if not any(id(p) in bucket_of for p in module.parameters(recurse=False)):
            if any(child is self.model for child in module.children()):
                # A wrapper of the model (torch.compile's OptimizedModule): the compiled
                # forward does not run these hooks per module, so it gets everything now.
                self.finish()
            return  # a container: its children wait for their own
        # A module with parameters of its own may compute with its children's without
        # calling them (nn.MultiheadAttention reads out_proj.weight): it waits for those too.
        # Only the buckets it reads: with two param groups (decay / no decay) the first
        # LayerNorm must not wait for every matrix.
        for p in module.parameters():
            i = bucket_of.get(id(p))
            if i is not None and self._works[i] is not None:
                self._wait(i)

    def _wait(self, i: int) -> None:
        self._works[i].wait()
        self._works[i] = None
        self._left -= 1
        if not self._left:
            self._remove_hook()

    def finish(self) -> None:
        """Wait for every bucket still in flight."""
        for i, work in enumerate(self._works):
            if work is not None:
                self._wait(i)
        self._works = []
        self._left = 0
        self._remove_hook()

    def _remove_hook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def bucket_gathers(comm: Comm, flat: FlatParams) -> Iterator[tuple[int, Any]]:
    """(elements, pending all-gather) per bucket of `flat`, each launched as it is reached:
    this rank's chunk into the full buffer, point to point where that is faster (gloo)."""
    for bucket, chunk in zip(flat.buckets, flat.own_chunks(flat.flat)):
        full = flat.bucket_view(flat.flat, bucket)
        yield full.numel(), comm.all_gather(full, chunk, async_op=True, one_collective=False)


def _finisher(ref: weakref.ref) -> Callable[..., None]:
    """A state-dict pre-hook that finishes the gather; it holds the gather weakly, so the
    model does not keep a dead optimizer's buffers alive."""

    def hook(*_: Any) -> None:
        gather = ref()
        if gather is not None:
            gather.finish()

    return hook

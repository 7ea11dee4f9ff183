"""`zeroshard.Init`: build a model whose parameters are partitioned as they are created.

    with zeroshard.Init(config):
        model = MyModel()          # each rank holds ~1/N of it from the start

Every `nn.Module` subclass's `__init__` is wrapped while the context is open (classes defined
inside it too). When the outermost `__init__` of a module returns (so its
`reset_parameters()` has run), the module's own parameters are packed into a unit and only
this rank's chunk is kept. Children finish before their parent, so at any moment a rank
holds the shards built so far plus one module's full parameters: peak about model/N plus
the largest layer. Every rank must build the same model with the same random seed (the
values are the same as without Init). Code in a parent's `__init__` that touches children's
parameters already partitioned (`self.apply(init_fn)`, `nn.init.*_(p)`) is caught by a
TorchFunctionMode and runs on gathered full tensors, written back after each call.
`zeroshard.initialize` later adopts these units.

A partitioned parameter keeps its full shape (`p.shape`, `p.dim()`, `p.numel()`: a
one-element placeholder, shapes.py), so shape-based recipes such as nanoGPT's
`p.dim() >= 2` weight-decay groups work on the model as built; `zeroshard.stage3.full_shape`
is DeepSpeed's `p.ds_shape`. Until `initialize`, `model.state_dict()` / `load_state_dict()`
gather each module's units as the stage-3 engine's hooks do later (collective: every rank).
"""

from __future__ import annotations

import functools
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.overrides import TorchFunctionMode

from zeroshard import guards
from zeroshard.comm.collectives import Comm
from zeroshard.config.honoured import stage3_bucket_numel
from zeroshard.config.schema import ZeroConfig, load_config
from zeroshard.quant8.codec import codec_for
from zeroshard.shard.codec import FP32, alignment_of
from zeroshard.stage3 import registry, shapes
from zeroshard.stage3.unit import RELEASED, GatherTracker, ShardedUnit

# Metadata reads need no parameter values (a placeholder has the full shape: no gather for a
# parameter count or a `p.dim()` test in a parent's __init__).
_METADATA = shapes.METADATA_READS


class _PartitionedUseMode(TorchFunctionMode):
    """Inside Init, code may still touch parameters already partitioned: a parent's
    `self.apply(self._init_weights)` or `nn.init.normal_(p)` over `named_parameters()`. Such a
    call gathers the units involved, runs on the full tensors, and writes every rank's chunk
    back (all ranks run the same code with the same RNG, so the full values agree)."""

    def __init__(self) -> None:
        super().__init__()
        self.busy = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.busy or func in _METADATA:
            return func(*args, **kwargs)
        units: list[ShardedUnit] = []
        for a in (*args, *kwargs.values()):
            for x in a if isinstance(a, (list, tuple)) else (a,):
                u = registry.unit_of(x) if isinstance(x, torch.Tensor) else None
                if u is not None and u.state == RELEASED and u not in units:
                    units.append(u)
        if not units:
            return func(*args, **kwargs)
        self.busy = True
        try:
            for u in units:
                u.wait()
        finally:
            self.busy = False
        out = func(*args, **kwargs)
        self.busy = True
        try:
            for u in units:
                guards.broadcast_from_rank0(u.comm, u.params)  # every rank takes rank 0's values
                u.write_back()
                u.release_if_unused()
        finally:
            self.busy = False
        return out


def _subclasses(cls: type) -> list[type]:
    out, todo = [], [cls]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in out:
                out.append(sub)
                todo.append(sub)
    return out


class Init:
    """Context manager partitioning parameters at construction (see module docstring).

    Args:
        config: a ZeroConfig, dict or path (dtype, bucket size, persistence threshold); None
            keeps parameters' dtype with default sizes.
        process_group: the ranks to shard across (default: the world).
        enabled: False makes the context a no-op (build normally).
    """

    def __init__(
        self,
        config: ZeroConfig | dict | str | None = None,
        *,
        process_group: dist.ProcessGroup | None = None,
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        if enabled:
            guards.check_world_env(process_group)
        cfg = None if config is None else (
            config if isinstance(config, ZeroConfig) else load_config(config)
        )  # fmt: skip
        zo = cfg.zero_optimization if cfg is not None else None
        self.dtype = cfg.compute_dtype if cfg is not None else None
        self.bucket_numel = stage3_bucket_numel(zo) if zo else 500_000_000
        threshold = zo.stage3_param_persistence_threshold if zo else 0
        self.threshold = threshold if isinstance(threshold, int) else 0  # "auto": shard all
        # units laid out as the configured optimizer's state codec needs (AdamW8bit: blocks)
        codec = codec_for(*cfg.optimizer_spec(), FP32)[0] if cfg is not None else FP32
        self.align = alignment_of(codec)
        self.comm = Comm(process_group)
        self.tracker = GatherTracker()
        self._saved: dict[type, Any] = {}
        self._depth: dict[int, int] = {}  # id(module) -> nesting of its __init__ calls
        self._saved_init_subclass: Any = None
        self._state_dict_hooks = _StateDictHooks(self.tracker)

    # -- patching -------------------------------------------------------------------------
    def __enter__(self) -> Init:
        if not self.enabled:
            return self
        for cls in _subclasses(nn.Module):
            self._wrap(cls)
        wrap = self._wrap
        self._saved_init_subclass = nn.Module.__dict__.get("__init_subclass__")

        def init_subclass(cls: type, **kwargs: Any) -> None:
            super(nn.Module, cls).__init_subclass__(**kwargs)
            wrap(cls)

        nn.Module.__init_subclass__ = classmethod(init_subclass)  # type: ignore[assignment]
        self._mode = _PartitionedUseMode()
        self._mode.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.enabled:
            return
        self._mode.__exit__(exc_type, exc, tb)
        for cls, orig in self._saved.items():
            cls.__init__ = orig  # type: ignore[misc]
        self._saved.clear()
        if self._saved_init_subclass is None:
            del nn.Module.__init_subclass__
        else:
            nn.Module.__init_subclass__ = self._saved_init_subclass  # type: ignore[assignment]

    def _wrap(self, cls: type) -> None:
        orig = cls.__dict__.get("__init__")
        if orig is None or cls in self._saved:
            return
        self._saved[cls] = orig
        depths, partition = self._depth, self._partition

        @functools.wraps(orig)
        def init(module: nn.Module, *args: Any, **kwargs: Any) -> None:
            # nested constructors (super().__init__, a child built inside) partition once,
            # when the outermost one returns
            depth = depths.get(id(module), 0)
            depths[id(module)] = depth + 1
            try:
                orig(module, *args, **kwargs)
            finally:
                if depth:
                    depths[id(module)] = depth
                else:
                    depths.pop(id(module), None)
            if depth == 0:
                partition(module)

        cls.__init__ = init  # type: ignore[misc]

    # -- partitioning ---------------------------------------------------------------------
    def _partition(self, module: nn.Module) -> None:
        self._mode.busy = True
        try:
            self._partition_params(module)
        finally:
            self._mode.busy = False

    def _partition_params(self, module: nn.Module) -> None:
        fresh: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in module.parameters(recurse=False):
            if registry.unit_of(p) is not None:
                continue
            if self.dtype is not None and p.is_floating_point() and p.dtype != self.dtype:
                with torch.no_grad():
                    p.data = p.data.to(self.dtype)
            fresh.setdefault(p.dtype, []).append(p)
        for params in fresh.values():  # each parameter keeps its unit alive (the registry)
            guards.broadcast_from_rank0(self.comm, params)  # every rank takes rank 0's values
            numel = sum(p.numel() for p in params)
            ShardedUnit(
                params, self.comm, self.bucket_numel, name=type(module).__name__,
                tracker=self.tracker, persistent=numel < self.threshold, align=self.align,
            )  # fmt: skip
        if fresh:
            self._state_dict_hooks.install(module)


class _StateDictHooks:
    """`state_dict()` / `load_state_dict()` of a module built under Init, before `initialize`:
    full tensors, never placeholders. A unit adopted by an engine (its tracker replaced)
    is the engine's hooks' business: these step aside."""

    def __init__(self, tracker: GatherTracker) -> None:
        self.tracker = tracker

    def install(self, module: nn.Module) -> None:
        # plain functions: torch marks a state-dict hook with an attribute (no bound methods)
        module.register_state_dict_post_hook(lambda *a: self.save(*a))
        module.register_load_state_dict_pre_hook(lambda *a: self.load_pre(*a))
        module.register_load_state_dict_post_hook(lambda *a: self.load_post(*a))

    def units(self, module: nn.Module) -> list[ShardedUnit]:
        out: list[ShardedUnit] = []
        for p in module.parameters(recurse=False):
            u = registry.unit_of(p)
            if u is not None and u.tracker is self.tracker and u not in out:
                out.append(u)
        return out

    def save(self, module: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
        units = self.units(module)
        for u in units:
            u.wait()
        try:
            for name, p in module.named_parameters(recurse=False):
                if registry.unit_of(p) in units and prefix + name in state_dict:
                    state_dict[prefix + name] = p.detach().clone()
        finally:
            for u in units:
                u.release_if_unused()

    def load_pre(self, module: nn.Module, *_: Any) -> None:
        for u in self.units(module):
            u.wait()
            u.acquire()

    def load_post(self, module: nn.Module, _incompatible: Any) -> None:
        for u in self.units(module):
            u.write_back()  # every rank loaded the same dict: each keeps its own chunks
            u.drop_use()
            u.release_if_unused()

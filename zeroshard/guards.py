"""Guards at the seams: what ordinary user habits do to a zeroshard optimizer.

Inside its own loop zeroshard matches torch.optim; these checks cover what happens around it,
so that a habit from DDP, DeepSpeed or the Hugging Face Trainer gives the right result or a
clear error, never a silently wrong trajectory:

- construction: meta-device parameters, an optimizer with nothing to train, and a second
  optimizer over parameters another live one manages (a registry of owners, weak references);
- initial weights: broadcast from rank 0 at every stage, as DDP does;
- each step: the process group appearing after construction, parameters whose storage was
  replaced (`model.to(...)`, `p.data = ...`: re-linked to the flat buffer), and a model
  wrapped in DistributedDataParallel.

The core calls in here with one commented line per seam; the logic lives here.
"""

from __future__ import annotations

import gc
import os
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from zeroshard import shutdown

# parameter -> weak reference to the optimizer managing it (keys by identity: tensors' `==`
# is elementwise, so a plain WeakKeyDictionary cannot hold them)
_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()
# parameter -> handles of the gradient hooks its owner installed (removed with a dead owner)
_HOOKS: WeakIdKeyDictionary = WeakIdKeyDictionary()
# optimizers already scanned for a DistributedDataParallel wrapper (no attribute set on them)
_DDP_CHECKED: weakref.WeakSet = weakref.WeakSet()
# stage -> how moved parameters are re-linked (stage 3 registers its own: stage3/relink.py)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# -- construction ---------------------------------------------------------------------------
def launched_world_size() -> int:
    """WORLD_SIZE as torchrun (or `zeroshard run`) set it; 1 when not launched by one."""
    text = os.environ.get("WORLD_SIZE", "1").strip()
    return int(text) if text.isdigit() else 1


def check_world_env(process_group: Any) -> None:
    """Launched on several ranks (WORLD_SIZE > 1) but no process group: every rank would
    train alone at world size 1, with nothing said. Refuse at construction instead."""
    if process_group is not None or (dist.is_available() and dist.is_initialized()):
        return
    world = launched_world_size()
    if world > 1:
        raise RuntimeError(
            f"rank {os.environ.get('RANK', '?')}: WORLD_SIZE={world} is set (launched by "
            "torchrun or `zeroshard run`) but no torch.distributed process group exists, so "
            "this rank would train alone: call torch.distributed.init_process_group() before "
            "building the optimizer, or use zeroshard.initialize(model, config), which starts "
            "the process group from the launcher's environment (TrainingArguments and "
            "Accelerator() start it too: create them before the optimizer)"
        )


def check_params(params: Iterable[Tensor]) -> None:
    """Parameters must hold values: a meta-device model cannot be trained."""
    for p in params:
        if p.device.type == "meta":
            raise ValueError(
                f"rank {_rank()}: a parameter of shape {tuple(p.shape)} is on the meta device "
                "(it has no values): materialise the model before building the optimizer "
                "(model.to_empty(device=...) then initialise or load its weights)"
            )


def on_param_group(optimizer: Any, params: list[Tensor]) -> None:
    """A new param group: values present, nobody else's, frozen ones start as rank 0's
    (trainable ones are broadcast with their flat buffer)."""
    trainable = [p for p in params if p.requires_grad]
    check_params(params)
    claim(optimizer, trainable)
    if optimizer.stage != 3:  # stage 3 broadcast the whole module when it sharded it
        broadcast_from_rank0(optimizer.comm, [p for p in params if not p.requires_grad])


def check_trainable(optimizer: Any) -> None:
    """An optimizer whose parameters are all frozen would fail at its first step."""
    if next(optimizer.trainable_params(), None) is not None:
        return
    n = sum(len(g["params"]) for g in optimizer.param_groups)
    raise ValueError(
        f"rank {_rank()}: {type(optimizer).__name__} got no trainable parameters (all {n} "
        "have requires_grad=False): pass the parameters to train, e.g. "
        "[p for p in model.parameters() if p.requires_grad], or unfreeze some first"
    )


def claim(optimizer: Any, params: Iterable[Tensor]) -> None:
    """Register `optimizer` as the manager of `params`; a second live optimizer over the same
    parameters would take their gradients from the first (or the first from it) and train
    nothing, so it is an error. The hooks of an optimizer nobody references are removed."""
    params = list(params)
    shutdown.register()  # a clean exit without destroy_process_group()
    for attempt in range(2):
        for p in params:
            ref = _OWNERS.get(p)
            owner = ref() if ref is not None else None
            if owner is not None and owner is not optimizer:
                if attempt == 0:
                    break  # maybe garbage not collected yet: collect once, then decide
                raise ValueError(
                    f"rank {_rank()}: a parameter of shape {tuple(p.shape)} is already managed "
                    f"by another live {type(owner).__name__}: build one zeroshard optimizer "
                    "per set of parameters (a second one would take the gradients of the first "
                    "and train nothing); reuse the first one, or drop every reference to it "
                    "(del optimizer) before building a new one"
                )
        else:
            break
        gc.collect()
    ref = weakref.ref(optimizer)
    for p in params:
        old = _OWNERS.get(p)
        if old is not None and old() is None:  # a dead owner's hooks would still steal grads
            for h in _HOOKS.pop(p, []):
                h.remove()
        _OWNERS[p] = ref


def track_hook(param: Tensor, handle: Any) -> None:
    """Remember a gradient hook zeroshard put on `param` (removed if its optimizer dies)."""
    _HOOKS.setdefault(param, []).append(handle)


def owner_of(param: Tensor) -> Any:
    """The live zeroshard optimizer managing `param`, or None."""
    ref = _OWNERS.get(param)
    return ref() if ref is not None else None


# -- initial weights ------------------------------------------------------------------------
@torch.no_grad()
def broadcast_from_rank0(comm: Any, tensors: Iterable[Tensor]) -> None:
    """Make every rank start from rank 0's values, as DDP does at construction (ranks seeded
    differently would otherwise stay different, or be stitched from several ranks' chunks).
    Not counted in `comm_report()`: it is set-up, not a training step's traffic."""
    if not comm.active:
        return
    for t in tensors:
        if t.numel():
            comm.broadcast(t.data, 0, counted=False)


def broadcast_module_state(
    comm: Any, model: nn.Module, skip: Callable[[Tensor], bool] | None = None
) -> None:
    """Rank 0's parameters and floating buffers, to every rank. `skip(p)` marks parameters
    broadcast elsewhere (sharded by `zeroshard.Init`, or an optimizer's flat buffer)."""
    check_params(model.parameters())
    params = [p for p in model.parameters() if skip is None or not skip(p)]
    broadcast_from_rank0(comm, list(dict.fromkeys(params)) + list(model.buffers()))


# -- every step -----------------------------------------------------------------------------
def check_process_group(comm: Any) -> None:
    """The optimizer saw no process group when it was built but one exists now."""
    if comm.initialized or not (dist.is_available() and dist.is_initialized()):
        return
    n = dist.get_world_size()
    if n == 1:
        return
    raise RuntimeError(
        f"rank {dist.get_rank()}: this zeroshard optimizer was built before "
        "torch.distributed.init_process_group() and so shards for 1 process, but the process "
        f"group now has {n} ranks: call init_process_group() first, then build the optimizer "
        "(with the Hugging Face Trainer: create TrainingArguments before the optimizer)"
    )


_DDP_HELP = (
    "zeroshard averages gradients itself, so DistributedDataParallel must not wrap the model "
    "(DDP would all-reduce gradients zeroshard already took: zeros at stages 0-2, an autograd "
    "error at stage 3): pass the bare model (ddp_model.module) and drop the DDP wrapper. "
    "With the Hugging Face Trainer use zeroshard.integrations.transformers.ZeroShardTrainer("
    "zeroshard_config=...) instead of Trainer(optimizers=(zeroshard optimizer, ...)); with "
    "Accelerate build model and optimizer with zeroshard.initialize(model, config) and pass "
    "only the data loaders to accelerator.prepare (docs/integrations.md)"
)


def check_not_ddp(model: nn.Module) -> None:
    """`initialize` was handed a DDP-wrapped model."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError(f"rank {_rank()}: zeroshard.initialize got a DistributedDataParallel: "
                         + _DDP_HELP)  # fmt: skip


def check_ddp_forward(*_: Any) -> None:
    """Forward pre-hook (and stage-3 root forward): is DDP running this forward?"""
    if nn.parallel.DistributedDataParallel._active_ddp_module is not None:
        raise RuntimeError(f"rank {_rank()}: a zeroshard model runs inside "
                           "DistributedDataParallel: " + _DDP_HELP)  # fmt: skip


def check_ddp_once(optimizer: Any) -> None:
    """Drop-in optimizers see no model: once, at the first step, look for a live DDP module
    holding any of their parameters (one scan of the garbage collector's objects)."""
    if optimizer in _DDP_CHECKED:
        return
    _DDP_CHECKED.add(optimizer)
    if not (dist.is_available() and dist.is_initialized()):
        return
    ours = {id(p) for g in optimizer.param_groups for p in g["params"]}
    ddp = nn.parallel.DistributedDataParallel
    for obj in gc.get_objects():
        # type(), not isinstance(): isinstance reads `__class__`, and deprecated objects such
        # as torch.distributed.reduce_op warn on every attribute read
        if issubclass(type(obj), ddp):
            if any(id(p) in ours for p in obj.module.parameters()):
                raise RuntimeError(f"rank {_rank()}: the parameters of this zeroshard "
                                   "optimizer belong to a DistributedDataParallel model: "
                                   + _DDP_HELP)  # fmt: skip


def before_step(optimizer: Any) -> None:
    """The checks `step()` runs before it reads gradients."""
    check_process_group(optimizer.comm)
    check_ddp_once(optimizer)
    optimizer.sharding.relink_moved()


@torch.no_grad()
def relink(p: Tensor, view: Tensor, shape: torch.Size) -> bool:
    """Make a moved `p` a view of `view` (its slice of a flat buffer) again, keeping its
    current values: True if they differ from what the buffer held."""
    check_same_kind(p, view)
    new = p.data.reshape(-1)
    changed = not torch.equal(new, view)
    if changed:
        view.copy_(new)
    p.data = view.view(shape)
    return changed


def check_same_kind(p: Tensor, view: Tensor) -> None:
    if p.dtype != view.dtype or p.device != view.device:
        raise RuntimeError(
            f"rank {_rank()}: a parameter of shape {tuple(p.shape)} was moved to "
            f"{p.device}/{p.dtype} after the optimizer was built on {view.device}/{view.dtype}: "
            "move or cast the model before building the optimizer (zeroshard.initialize casts "
            "it for you from the config)"
        )

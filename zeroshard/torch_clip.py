"""`torch.nn.utils.clip_grad_norm_` over zeroshard parameters clips by the true global norm.

The HF Trainer, Accelerate and Lightning clip with `torch.nn.utils.clip_grad_norm_(params)`.
zeroshard moves each gradient out of `param.grad` as backward produces it (into flat buffers,
and at stage 2/3 only this rank's shard survives the reduce-scatter), so torch's function
would see no gradients, return 0.0 and clip nothing. Giving `.grad` back as full tensors
would cost the memory stage 2/3 exist to save. Instead, the first zeroshard optimizer built
wraps the function (both `torch.nn.utils.clip_grad_norm_` and `torch.nn.utils.clip_grad.
clip_grad_norm_`, the names the frameworks call at run time): when the parameters passed are
exactly the trainable parameters of one zeroshard optimizer, the call is answered by that
optimizer's `clip_grad_norm_` (global norm over every rank's shard, same coefficient as
torch, applied in the next `step()`); parameters not managed by zeroshard go to torch's own
function unchanged; anything in between is an error saying why.

Limit (documented in the README): code holding torch's original function from before the
first zeroshard optimizer was built (`from torch.nn.utils import clip_grad_norm_` at import
time) bypasses the wrapper and still sees no gradients.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import torch
import torch.nn.utils as nn_utils
import torch.nn.utils.clip_grad as clip_grad_module
from torch import Tensor

from zeroshard import guards

_original = None


def install() -> None:
    """Wrap torch's clip_grad_norm_ (once per process)."""
    global _original
    if _original is not None:
        return
    _original = clip_grad_module.clip_grad_norm_
    wrapped = functools.wraps(_original)(clip_grad_norm_)
    nn_utils.clip_grad_norm_ = wrapped
    clip_grad_module.clip_grad_norm_ = wrapped


def clip_grad_norm_(
    parameters: Tensor | Iterable[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    trainable = [p for p in params if p.requires_grad]
    owners = {id(o): o for o in (guards.owner_of(p) for p in trainable) if o is not None}
    if not owners:
        return _original(params, max_norm, norm_type, error_if_nonfinite, foreach)
    if len(owners) > 1 or any(guards.owner_of(p) is None for p in trainable):
        raise RuntimeError(
            "torch.nn.utils.clip_grad_norm_ got parameters of several optimizers (zeroshard "
            "and others): clip each optimizer's parameters in a separate call"
        )
    (opt,) = owners.values()
    mine = {id(p) for g in opt.param_groups for p in g["params"] if p.requires_grad}
    if {id(p) for p in trainable} != mine:
        raise RuntimeError(
            f"torch.nn.utils.clip_grad_norm_ got {len(trainable)} of the {len(mine)} trainable "
            "parameters of a zeroshard optimizer: zeroshard clips by the global norm of all of "
            "them; pass all its parameters (model.parameters()) or call "
            "optimizer.clip_grad_norm_(max_norm)"
        )
    if float(norm_type) != 2.0:
        raise RuntimeError(
            f"torch.nn.utils.clip_grad_norm_ with norm_type={norm_type}: zeroshard clips by "
            "the L2 norm only; use norm_type=2"
        )
    norm = opt.clip_grad_norm_(float(max_norm))
    if error_if_nonfinite and not math.isfinite(float(norm)):
        raise RuntimeError(
            f"The total norm of order {float(norm_type)} for gradients from `parameters` is "
            "non-finite, so it cannot be clipped. To disable this error and scale the "
            "gradients by the non-finite norm anyway, set `error_if_nonfinite=False`"
        )
    return norm.to(torch.float32)

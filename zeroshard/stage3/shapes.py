"""Full shapes of stage-3 parameters, and the placeholder a released parameter holds.

Between uses a stage-3 parameter keeps no values, but shape-based code still reads it:
nanoGPT's `configure_optimizers` splits decay / no-decay groups on `p.dim() >= 2`, and
parameter counts sum `p.numel()`. So a released parameter's `.data` is a placeholder of the
FULL shape that owns one element: a zero-stride view of a per-(dtype, device) sentinel.
`shape`, `dim()`, `size()` and `numel()` answer as for the full tensor; most in-place ops
raise ("more than one element of the written-to tensor refers to a single memory location";
`fill_` / `zero_` do not check: they write the shared element); reading it gives NaN
(floating dtypes), so values used outside a gather show up in the loss, not as numbers.

`full_shape(p)` / `full_numel(p)` are the accessors DeepSpeed users know as `p.ds_shape` /
`p.ds_numel`: the full shape and element count of any parameter, sharded or not, whatever
its `.data` holds at the moment (zeroshard sets no attribute on user parameters).
"""

from __future__ import annotations

import torch
from torch import Tensor

from zeroshard.stage3 import registry

# Torch functions that read a tensor's metadata, not its values: a released placeholder
# answers them right, so they never gather (a TorchFunctionMode sees the property getters).
METADATA_READS = frozenset(
    [
        getattr(Tensor, name).__get__
        for name in ("dtype", "device", "requires_grad", "is_cuda", "is_leaf", "grad_fn",
                     "layout", "shape", "ndim")
    ]
    + [Tensor.dim, Tensor.ndimension, Tensor.size, Tensor.numel, Tensor.nelement,
       Tensor.__len__, torch.numel]
)  # fmt: skip

# One element per (dtype, device) for every placeholder in the process: releasing a unit
# allocates nothing.
_SENTINELS: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def placeholder(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A tensor of `shape` that answers shape queries truthfully and holds one element."""
    key = (dtype, torch.device(device))
    one = _SENTINELS.get(key)
    if one is None:
        fill = float("nan") if dtype.is_floating_point or dtype.is_complex else 0
        one = _SENTINELS[key] = torch.full((), fill, dtype=dtype, device=device)
    return one.expand(shape)


def full_shape(param: Tensor) -> torch.Size:
    """The full shape of `param` (DeepSpeed's `param.ds_shape`): a stage-3 parameter's
    unpartitioned shape, gathered or not; any other tensor's own shape."""
    unit = registry.unit_of(param)
    if unit is None:
        return param.shape
    return unit.slots[unit.index[id(param)]].shape


def full_numel(param: Tensor) -> int:
    """The full number of elements of `param` (DeepSpeed's `param.ds_numel`)."""
    unit = registry.unit_of(param)
    if unit is None:
        return param.numel()
    return unit.slots[unit.index[id(param)]].numel

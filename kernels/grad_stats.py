"""Fused gradient statistics: sum of squares and non-finite count in one read of the grads.

Bytes moved per element: reads g = 4 B (2 B for bf16/fp16 grads); writes 8 B per program.
Global-norm clipping and the inf/nan check then need one all-reduce of a scalar pair instead of
two passes and two collectives. Each program writes its partial pair and torch sums the
partials: deterministic, unlike atomics, and no zero-initialised accumulator to reset.

One fixed config on GPU (a read-only reduction reaches bandwidth without tuning, and tuning
would change the number of partials).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._common import GRAD_DTYPES, INTERPRET, INTERPRET_BLOCK

GPU_BLOCK = 4096
GPU_WARPS = 8


@triton.jit
def _stats(g):
    g = g.to(tl.float32)
    bad = (g != g) | (tl.abs(g) == float("inf"))
    return tl.sum(g * g, axis=0), tl.sum(bad.to(tl.float32), axis=0)


@triton.jit
def grad_stats_kernel(g_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out[pid] = (sum of g^2, count of inf/nan) over this program's block."""
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:  # full block: unmasked, so loads vectorise
        sq, bad = _stats(tl.load(g_ptr + offs))
    else:
        sq, bad = _stats(tl.load(g_ptr + offs, mask=offs < n, other=0.0))
    tl.store(out_ptr + 2 * pid, sq)
    tl.store(out_ptr + 2 * pid + 1, bad)


def grad_stats(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """fp32 [sum of squares, number of non-finite elements] over all flat `grads`."""
    if not grads:
        return torch.zeros(2, dtype=torch.float32)
    device = grads[0].device
    block = GPU_BLOCK if device.type == "cuda" and not INTERPRET else INTERPRET_BLOCK
    counts = [triton.cdiv(g.numel(), block) for g in grads]
    partials = torch.zeros(max(sum(counts), 1), 2, dtype=torch.float32, device=device)
    at = 0
    for g, k in zip(grads, counts):
        if g.dtype not in GRAD_DTYPES or not g.is_contiguous() or g.device != device:
            raise ValueError(f"grads must be contiguous {GRAD_DTYPES} tensors on {device}")
        if k:
            grad_stats_kernel[(k,)](g, partials[at:], g.numel(), BLOCK=block,
                                    num_warps=GPU_WARPS)
        at += k
    return partials.sum(0)

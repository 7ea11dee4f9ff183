"""Fused SGD update (momentum, dampening, Nesterov, weight decay): one pass per flat shard.

Bytes moved per element (fp32 grads): with momentum, reads p, g, buf = 12 B, writes p, buf = 8 B,
20 B in all; without momentum, reads p, g = 8 B, writes p = 4 B, 12 B in all. bf16/fp16 model
copy: +2 B written. bf16/fp16 grads: -2 B read.

torch.optim.SGD semantics, including the first step (step == 1) setting the momentum buffer to
the gradient; the step test happens on the device, so a skipped first step needs no host logic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import COPY_DTYPES, GRAD_DTYPES, autotuned, check_piece, launch, store_copy


@triton.jit
def _sgd_block(p_ptr, g_ptr, buf_ptr, copy_ptr, offs, mask, lr, scale, first, momentum,
               om_dampening, weight_decay, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
               MAXIMIZE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_COPY: tl.constexpr):
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask)
    if HAS_SCALE:
        g = g * scale
    if MAXIMIZE:
        g = -g
    g = g + weight_decay * p
    if MOMENTUM:
        buf = tl.load(buf_ptr + offs, mask=mask)
        buf = tl.where(first, g, momentum * buf + om_dampening * g)
        tl.store(buf_ptr + offs, buf, mask=mask)
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    p = p - lr * g
    tl.store(p_ptr + offs, p, mask=mask)
    if HAS_COPY:
        store_copy(copy_ptr, offs, p, mask)


@triton.jit
def sgd_kernel(p_ptr, g_ptr, buf_ptr, copy_ptr, lr_ptr, step_ptr, scale_ptr, inf_ptr, n,
               momentum, om_dampening, weight_decay, MOMENTUM: tl.constexpr,
               NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_SCALE: tl.constexpr,
               HAS_INF: tl.constexpr, HAS_COPY: tl.constexpr, SIZE_CLASS: tl.constexpr,
               BLOCK: tl.constexpr):
    """p (and buf, copy) in place; torch.optim.SGD semantics."""
    go = True
    if HAS_INF:
        go = tl.load(inf_ptr) == 0
    if go:
        lr = tl.load(lr_ptr)
        first = tl.load(step_ptr) == 1
        scale = 1.0
        if HAS_SCALE:
            scale = tl.load(scale_ptr)
        start = tl.program_id(0).to(tl.int64) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        if start + BLOCK <= n:  # full block: unmasked, so loads/stores vectorise
            _sgd_block(p_ptr, g_ptr, buf_ptr, copy_ptr, offs, None, lr, scale, first, momentum,
                       om_dampening, weight_decay, MOMENTUM, NESTEROV, MAXIMIZE, HAS_SCALE,
                       HAS_COPY)
        else:
            _sgd_block(p_ptr, g_ptr, buf_ptr, copy_ptr, offs, offs < n, lr, scale, first,
                       momentum, om_dampening, weight_decay, MOMENTUM, NESTEROV, MAXIMIZE,
                       HAS_SCALE, HAS_COPY)


_sgd_tuned = autotuned(sgd_kernel, ("p_ptr", "buf_ptr", "copy_ptr"))


def sgd_update(
    p: torch.Tensor,
    g: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    *,
    lr: torch.Tensor,
    step: torch.Tensor,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    model_copy: torch.Tensor | None = None,
) -> None:
    """One SGD step on a flat fp32 shard, in place. `lr`, `step` (1-based), `grad_scale`,
    `found_inf` are 0-d fp32 device tensors; `momentum_buffer` is required iff momentum != 0."""
    if (momentum != 0) != (momentum_buffer is not None):
        raise ValueError("momentum_buffer must be given exactly when momentum != 0")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov momentum requires a momentum and zero dampening")
    check_piece("p", p, p)
    check_piece("grad", g, p, GRAD_DTYPES)
    check_piece("momentum_buffer", momentum_buffer, p)
    check_piece("model_copy", model_copy, p, COPY_DTYPES)
    launch(sgd_kernel, _sgd_tuned, p.numel(), p, g, momentum_buffer, model_copy, lr, step,
           grad_scale, found_inf, p.numel(), momentum, 1.0 - dampening, weight_decay,
           MOMENTUM=momentum_buffer is not None, NESTEROV=nesterov, MAXIMIZE=maximize,
           HAS_SCALE=grad_scale is not None, HAS_INF=found_inf is not None,
           HAS_COPY=model_copy is not None)

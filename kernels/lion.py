"""Fused Lion update (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

Bytes moved per element (fp32 grads): reads p, g, m = 12 B, writes p, m = 8 B, 20 B in all.
bf16/fp16 model copy: +2 B written. bf16/fp16 grads: -2 B read.

update = sign(b1*m + (1-b1)*g); p *= 1 - lr*wd; p -= lr*update; m = b2*m + (1-b2)*g.
torch has no fused Lion, so this kernel is the only one-pass implementation on GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import COPY_DTYPES, GRAD_DTYPES, autotuned, check_piece, launch, store_copy


@triton.jit
def _lion_block(p_ptr, g_ptr, m_ptr, copy_ptr, offs, mask, lr, scale, beta1, beta2, om_beta1,
                om_beta2, weight_decay, HAS_SCALE: tl.constexpr, HAS_COPY: tl.constexpr):
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask)
    m = tl.load(m_ptr + offs, mask=mask)
    if HAS_SCALE:
        g = g * scale
    c = beta1 * m + om_beta1 * g
    sign = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))
    p = p * (1.0 - lr * weight_decay) - lr * sign
    m = beta2 * m + om_beta2 * g
    tl.store(p_ptr + offs, p, mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    if HAS_COPY:
        store_copy(copy_ptr, offs, p, mask)


@triton.jit
def lion_kernel(p_ptr, g_ptr, m_ptr, copy_ptr, lr_ptr, scale_ptr, inf_ptr, n, beta1, beta2,
                om_beta1, om_beta2, weight_decay, HAS_SCALE: tl.constexpr,
                HAS_INF: tl.constexpr, HAS_COPY: tl.constexpr, SIZE_CLASS: tl.constexpr,
                BLOCK: tl.constexpr):
    """p, m (and copy) in place."""
    go = True
    if HAS_INF:
        go = tl.load(inf_ptr) == 0
    if go:
        lr = tl.load(lr_ptr)
        scale = 1.0
        if HAS_SCALE:
            scale = tl.load(scale_ptr)
        start = tl.program_id(0).to(tl.int64) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        if start + BLOCK <= n:  # full block: unmasked, so loads/stores vectorise
            _lion_block(p_ptr, g_ptr, m_ptr, copy_ptr, offs, None, lr, scale, beta1, beta2,
                        om_beta1, om_beta2, weight_decay, HAS_SCALE, HAS_COPY)
        else:
            _lion_block(p_ptr, g_ptr, m_ptr, copy_ptr, offs, offs < n, lr, scale, beta1, beta2,
                        om_beta1, om_beta2, weight_decay, HAS_SCALE, HAS_COPY)


_lion_tuned = autotuned(lion_kernel, ("p_ptr", "m_ptr", "copy_ptr"))


def lion_update(
    p: torch.Tensor,
    g: torch.Tensor,
    exp_avg: torch.Tensor,
    *,
    lr: torch.Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    model_copy: torch.Tensor | None = None,
) -> None:
    """One Lion step on a flat fp32 shard, in place. `lr`, `grad_scale`, `found_inf` are 0-d
    fp32 device tensors."""
    check_piece("p", p, p)
    check_piece("grad", g, p, GRAD_DTYPES)
    check_piece("exp_avg", exp_avg, p)
    check_piece("model_copy", model_copy, p, COPY_DTYPES)
    launch(lion_kernel, _lion_tuned, p.numel(), p, g, exp_avg, model_copy, lr, grad_scale,
           found_inf, p.numel(), beta1, beta2, 1.0 - beta1, 1.0 - beta2, weight_decay,
           HAS_SCALE=grad_scale is not None, HAS_INF=found_inf is not None,
           HAS_COPY=model_copy is not None)

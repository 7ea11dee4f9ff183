"""Fused Adam / AdamW update: one pass over a flat fp32 master shard.

Bytes moved per element (fp32 grads, no extras): reads p, g, m, v = 16 B, writes p, m, v = 12 B,
28 B in all. AMSGrad: +4 B read, +4 B written (max_exp_avg_sq). bf16/fp16 model copy: +2 B
written. bf16/fp16 grads: -2 B read. The kernel is bandwidth-bound: time ~ bytes / DRAM speed.

Gradient scale (1/loss_scale x clip coefficient), lr and step are read from device memory and
`found_inf` skips the whole update on the device: no host sync, no recompile when they change.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import COPY_DTYPES, GRAD_DTYPES, autotuned, check_piece, launch, store_copy


@triton.jit
def _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, copy_ptr, offs, mask, lr, scale,
                step_size, bc2_sqrt, beta1, beta2, om_beta1, om_beta2, eps, weight_decay,
                DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                HAS_SCALE: tl.constexpr, HAS_COPY: tl.constexpr):
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask)
    m = tl.load(m_ptr + offs, mask=mask)
    v = tl.load(v_ptr + offs, mask=mask)
    if HAS_SCALE:
        g = g * scale
    if MAXIMIZE:
        g = -g
    if DECOUPLED:
        p = p * (1.0 - lr * weight_decay)
    else:
        g = g + weight_decay * p
    m = beta1 * m + om_beta1 * g
    v = beta2 * v + om_beta2 * (g * g)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    if AMSGRAD:
        v = tl.maximum(tl.load(vmax_ptr + offs, mask=mask), v)
        tl.store(vmax_ptr + offs, v, mask=mask)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)
    tl.store(p_ptr + offs, p, mask=mask)
    if HAS_COPY:
        store_copy(copy_ptr, offs, p, mask)


@triton.jit
def adam_kernel(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, copy_ptr, lr_ptr, step_ptr, scale_ptr,
                inf_ptr, n, beta1, beta2, om_beta1, om_beta2, log_beta1, log_beta2, eps,
                weight_decay, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr,
                MAXIMIZE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr,
                HAS_COPY: tl.constexpr, SIZE_CLASS: tl.constexpr, BLOCK: tl.constexpr):
    """m, v, p (and vmax, copy) in place; torch.optim.Adam(W) semantics."""
    go = True
    if HAS_INF:
        go = tl.load(inf_ptr) == 0
    if go:
        lr = tl.load(lr_ptr)
        step = tl.load(step_ptr)
        scale = 1.0
        if HAS_SCALE:
            scale = tl.load(scale_ptr)
        # 1 - beta**step in fp64 (one scalar per program): in fp32 the cancellation at small
        # steps would cost ~1e-4 relative.
        step64 = step.to(tl.float64)
        bc1 = (1.0 - tl.exp(step64 * log_beta1)).to(tl.float32)
        bc2_sqrt = tl.sqrt_rn((1.0 - tl.exp(step64 * log_beta2)).to(tl.float32))
        step_size = lr / bc1
        start = tl.program_id(0).to(tl.int64) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        if start + BLOCK <= n:  # full block: unmasked, so loads/stores vectorise
            _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, copy_ptr, offs, None, lr, scale,
                        step_size, bc2_sqrt, beta1, beta2, om_beta1, om_beta2, eps,
                        weight_decay, DECOUPLED, AMSGRAD, MAXIMIZE, HAS_SCALE, HAS_COPY)
        else:
            _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, copy_ptr, offs, offs < n, lr,
                        scale, step_size, bc2_sqrt, beta1, beta2, om_beta1, om_beta2, eps,
                        weight_decay, DECOUPLED, AMSGRAD, MAXIMIZE, HAS_SCALE, HAS_COPY)


_adam_tuned = autotuned(adam_kernel, ("p_ptr", "m_ptr", "v_ptr", "vmax_ptr", "copy_ptr"))


def adam_update(
    p: torch.Tensor,
    g: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    max_exp_avg_sq: torch.Tensor | None,
    *,
    lr: torch.Tensor,
    step: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    maximize: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    model_copy: torch.Tensor | None = None,
) -> None:
    """One Adam (decoupled=False, L2 decay) or AdamW step on a flat fp32 shard, in place.

    `lr`, `step` (1-based, already incremented), `grad_scale` and `found_inf` are 0-d fp32
    device tensors; AMSGrad is on when `max_exp_avg_sq` is given.
    """
    check_piece("p", p, p)
    check_piece("grad", g, p, GRAD_DTYPES)
    check_piece("exp_avg", exp_avg, p)
    check_piece("exp_avg_sq", exp_avg_sq, p)
    check_piece("max_exp_avg_sq", max_exp_avg_sq, p)
    check_piece("model_copy", model_copy, p, COPY_DTYPES)
    launch(adam_kernel, _adam_tuned, p.numel(), p, g, exp_avg, exp_avg_sq, max_exp_avg_sq,
           model_copy, lr, step, grad_scale, found_inf, p.numel(), beta1, beta2, 1.0 - beta1,
           1.0 - beta2, math.log(beta1) if beta1 > 0 else -math.inf,
           math.log(beta2) if beta2 > 0 else -math.inf, eps, weight_decay,
           DECOUPLED=decoupled, AMSGRAD=max_exp_avg_sq is not None, MAXIMIZE=maximize,
           HAS_SCALE=grad_scale is not None, HAS_INF=found_inf is not None,
           HAS_COPY=model_copy is not None)

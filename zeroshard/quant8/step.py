"""The fused AdamW step on 8-bit states: dequantize, update, requantize, in place.

Backends: the Triton kernel (`zeroshard_kernels.adamw8bit_update`, CUDA or the interpreter) and
the CPU path here (chunks of whole blocks, one torch op per fp32 operation). Both follow the
order of operations in the package docstring and give identical bits.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from zeroshard.quant8.format import (
    BLOCK_SIZE,
    check_block_size,
    dequantize_into,
    kernel_tables,
    num_blocks,
    quant_scratch,
    requantize,
)

try:  # numpy's fp32 sqrt is the correctly rounded one (torch's is not) and fast
    import numpy as _np
except ImportError:  # pragma: no cover - numpy ships with the triton/dev extras
    _np = None

# Elements per pass of the CPU step: large enough that per-op overhead is small, small enough
# that the scratch buffers stay in the last-level cache between the ops of one pass.
_CHUNK = 1 << 17
_HYPER: dict[torch.device, tuple[Tensor, Tensor]] = {}


def hyper_params(*, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                 step: int) -> Tensor:
    """fp32[8] scalars of one step, computed in fp64 and rounded once, shared by both backends:
    beta1, beta2, 1 - beta1, 1 - beta2, eps, decay = 1 - lr*wd, step_size = lr / (1 - beta1^t),
    bc2_sqrt = sqrt(1 - beta2^t)."""
    if step < 1:
        raise ValueError(f"step is 1-based and already incremented, got {step}")
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    vals = [beta1, beta2, 1.0 - beta1, 1.0 - beta2, eps, 1.0 - lr * weight_decay, lr / bc1,
            math.sqrt(bc2)]
    return torch.tensor(vals, dtype=torch.float64).to(torch.float32)


def _check_piece(name: str, t: Tensor, numel: int, dtypes: tuple[torch.dtype, ...],
                 device: torch.device) -> None:
    if t.numel() != numel or not t.is_contiguous() or t.device != device:
        raise ValueError(f"{name} must be contiguous with {numel} elements on {device}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be one of {dtypes}, got {t.dtype}")


def _resolve(backend: str, device: torch.device) -> str:
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        try:
            import zeroshard_kernels  # noqa: F401
        except ImportError:
            return "torch"
        return "triton"
    if backend not in ("triton", "torch"):
        raise ValueError(f"unknown backend {backend!r}; expected auto, triton or torch")
    return backend


def adamw8bit_step_(
    param: Tensor,
    grad: Tensor,
    m_codes: Tensor,
    m_absmax: Tensor,
    v_codes: Tensor,
    v_absmax: Tensor,
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    step: int,
    block_size: int = BLOCK_SIZE,
    grad_scale: float | Tensor | None = None,
    found_inf: Tensor | None = None,
    model_copy: Tensor | None = None,
    backend: Literal["auto", "triton", "torch"] = "auto",
) -> None:
    """One AdamW step on a flat fp32 piece with 8-bit blockwise states, all in place.

    `param` must start at a block boundary of its parameter's global element index (a multiple
    of `block_size`); its last block may be short only where the parameter ends. `grad`: fp32,
    bf16 or fp16 (upcast exactly); `step`: 1-based, already incremented; `grad_scale` multiplies
    the grad; nonzero `found_inf` (0-d) skips the step, leaving everything bit-for-bit unchanged;
    `model_copy` (bf16/fp16) receives the new param rounded to nearest even. Backends
    ('torch' on any device, 'triton' on CUDA or under TRITON_INTERPRET=1) give identical bits.
    """
    check_block_size(block_size)
    n, dev = param.numel(), param.device
    nb = num_blocks(n, block_size)
    if param.dim() != 1:
        raise ValueError("param must be a 1-D fp32 piece")
    _check_piece("param", param, n, (torch.float32,), dev)
    _check_piece("grad", grad, n, (torch.float32, torch.bfloat16, torch.float16), dev)
    for name, t, size, dt in (("m_codes", m_codes, n, torch.uint8),
                              ("m_absmax", m_absmax, nb, torch.float32),
                              ("v_codes", v_codes, n, torch.uint8),
                              ("v_absmax", v_absmax, nb, torch.float32)):
        _check_piece(name, t, size, (dt,), dev)
    if model_copy is not None:
        _check_piece("model_copy", model_copy, n, (torch.bfloat16, torch.float16), dev)
    hyper = hyper_params(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                         step=step)
    if isinstance(grad_scale, Tensor):
        scale_t: Tensor | None = grad_scale.to(device=dev, dtype=torch.float32).reshape(())
    elif grad_scale is None or float(grad_scale) == 1.0:
        scale_t = None
    else:
        scale_t = torch.tensor(float(grad_scale), dtype=torch.float32, device=dev)
    if n == 0:
        return
    if _resolve(backend, dev) == "triton":
        from zeroshard_kernels import adamw8bit_update

        adamw8bit_update(param, grad, m_codes, m_absmax, v_codes, v_absmax,
                         hyper=_on_device(hyper, dev), tables=kernel_tables(dev),
                         block_size=block_size, grad_scale=scale_t, found_inf=found_inf,
                         model_copy=model_copy)
        return
    if found_inf is not None and float(found_inf) != 0.0:
        return
    scale = None if scale_t is None else float(scale_t)
    _torch_step(param, grad, m_codes, m_absmax, v_codes, v_absmax, hyper.tolist(), block_size,
                scale, model_copy)


def _on_device(hyper: Tensor, device: torch.device) -> Tensor:
    """`hyper` in a per-device buffer, copied only when it changed (once per step, not once per
    piece: a host-to-device copy from pageable memory can stall the host)."""
    entry = _HYPER.get(device)
    if entry is None or not torch.equal(entry[0], hyper):
        buf = entry[1] if entry is not None else torch.empty(8, dtype=torch.float32,
                                                               device=device)
        buf.copy_(hyper)
        entry = (hyper, buf)
        _HYPER[device] = entry
    return entry[1]


def _sqrt_rn(x: Tensor, out: Tensor, f64: Tensor) -> None:
    """out <- the correctly rounded fp32 sqrt of x (sqrt.rn on a GPU).

    torch's vectorised fp32 sqrt is 1 ulp off on ~20% of inputs. numpy's is exact; without it,
    the fp64 sqrt rounded to fp32 is (fp64 has more than 2 * 24 + 2 bits), at 5x the cost.
    """
    if _np is not None and x.device.type == "cpu":
        _np.sqrt(x.numpy(), out=out.numpy())
    else:
        d = f64[: x.numel()].copy_(x)
        torch.sqrt(d, out=d)
        out.copy_(d)


def _torch_step(p: Tensor, grad: Tensor, mc: Tensor, ma: Tensor, vc: Tensor, va: Tensor,
                h: list[float], bs: int, scale: float | None, model_copy: Tensor | None) -> None:
    """The step in chunks of whole blocks; each line is one fp32 op, in the documented order.

    No torch op with a fused multiply-add is used (add/sub with alpha, addcmul, addcdiv, lerp
    may contract on CPU): the Triton kernel must see the same roundings.
    """
    beta1, beta2, om1, om2, eps, decay, step_size, bc2_sqrt = h
    n, dev = p.numel(), p.device
    chunk = max(bs, _CHUNK // bs * bs)
    width = min(chunk, num_blocks(n, bs) * bs)
    m_buf = quant_scratch(dev, "m", width, torch.float32)
    v_buf = quant_scratch(dev, "v", width, torch.float32)
    u_buf = quant_scratch(dev, "u", width, torch.float32)
    g_buf = quant_scratch(dev, "g", width, torch.float32)
    i_buf = quant_scratch(dev, "idx", width, torch.int32)
    f_buf = quant_scratch(dev, "flag", width, torch.bool)
    d_buf = quant_scratch(dev, "sqrt", 0 if _np is not None and dev.type == "cpu" else width,
                     torch.float64)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        k, b0 = e - s, s // bs
        nbc = num_blocks(k, bs)
        m, v, u = m_buf[:nbc * bs], v_buf[:nbc * bs], u_buf[:nbc * bs]
        idx, flag = i_buf[:k], f_buf[:k]
        mcs, mas, vcs, vas = mc[s:e], ma[b0:b0 + nbc], vc[s:e], va[b0:b0 + nbc]
        dequantize_into(m, k, bs, True, mcs, mas, idx)
        dequantize_into(v, k, bs, False, vcs, vas, idx)
        g = grad[s:e]
        if g.dtype != torch.float32 or scale is not None:
            g = g_buf[:k].copy_(g)
            if scale is not None:
                g.mul_(scale)
        pc, mk, vk, uk = p[s:e], m[:k], v[:k], u[:k]
        if decay != 1.0:  # p * 1.0 == p exactly: skipping it changes no bit
            pc.mul_(decay)
        mk.mul_(beta1)
        torch.mul(g, om1, out=uk)
        mk.add_(uk)
        torch.mul(g, g, out=uk)
        uk.mul_(om2)
        vk.mul_(beta2)
        vk.add_(uk)
        _sqrt_rn(vk, uk, d_buf)
        uk.div_(bc2_sqrt)
        uk.add_(eps)
        torch.div(mk, uk, out=uk)
        uk.mul_(step_size)
        pc.sub_(uk)
        if model_copy is not None:
            model_copy[s:e].copy_(pc)
        requantize(m, k, bs, True, mcs, mas, u, idx, flag)
        requantize(v, k, bs, False, vcs, vas, u, idx, flag)

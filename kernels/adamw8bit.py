"""Fused AdamW with blockwise 8-bit states: dequantize, update, requantize in one pass.

Each program owns BLOCK // QBLOCK whole quantization blocks (a [ROWS, QBLOCK] tile), so the new
absmax of a block is a row maximum and never crosses programs. The format, the rounding and the
order of operations are defined in zeroshard/quant8.py; this kernel reproduces them bit for bit:
every scalar is read as fp32 from `hyper_ptr` (a float argument would be fp64 in the interpreter)
and the launch disables fp fusion (a contracted multiply-add would round differently).

Bytes moved per element (fp32 grads): reads p, g, 2 codes = 10 B, writes p, 2 codes = 6 B, plus
16 B per block for the two absmax (read + write): 16 + 16 / QBLOCK B, against 28 B for fp32
AdamW. bf16/fp16 grads: -2 B; a bf16/fp16 model copy: +2 B. The table lookups (1 KB, cached)
are not counted.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    COPY_DTYPES,
    GPU_CONFIGS,
    GRAD_DTYPES,
    INTERPRET,
    INTERPRET_BLOCK,
    check_piece,
    size_class,
    store_copy,
)

# hyper_ptr (fp32[8], zeroshard.quant8.hyper_params): beta1, beta2, 1 - beta1, 1 - beta2, eps,
# decay, step_size, bc2_sqrt. tab_ptr (fp32[1024], quant8.kernel_tables): signed map at 0,
# unsigned map at 256, signed midpoints at 512, unsigned midpoints at 768.


@triton.jit
def _quantize(x, mid_ptr):
    """#{k : mid[k] < x} over the 256 sorted midpoints (mid[255] = +inf): branchless search."""
    code = tl.zeros(x.shape, dtype=tl.int32)
    for k in tl.static_range(8):
        probe = tl.load(mid_ptr + (code + ((128 >> k) - 1)))
        code = tl.where(probe < x, code + (128 >> k), code)
    return code


@triton.jit
def requantize(s, codes_ptr, absmax_ptr, offs, rows, mask, row_mask, mid_ptr):
    """Store codes and the new per-row absmax of the fp32 tile `s` (masked lanes hold 0)."""
    amax = tl.max(tl.abs(s), axis=1)
    den = tl.where(amax > 0, amax, 1.0)
    x = tl.div_rn(s, den[:, None])
    code = _quantize(x, mid_ptr)
    tl.store(codes_ptr + offs, code.to(tl.uint8), mask=mask)
    tl.store(absmax_ptr + rows, amax, mask=row_mask)


@triton.jit
def _adamw8bit_tile(p_ptr, g_ptr, mq_ptr, ma_ptr, vq_ptr, va_ptr, copy_ptr, hyper_ptr, tab_ptr,
                    offs, rows, mask, row_mask, scale, HAS_SCALE: tl.constexpr,
                    HAS_COPY: tl.constexpr):
    beta1 = tl.load(hyper_ptr + 0)
    beta2 = tl.load(hyper_ptr + 1)
    om_beta1 = tl.load(hyper_ptr + 2)
    om_beta2 = tl.load(hyper_ptr + 3)
    eps = tl.load(hyper_ptr + 4)
    decay = tl.load(hyper_ptr + 5)
    step_size = tl.load(hyper_ptr + 6)
    bc2_sqrt = tl.load(hyper_ptr + 7)
    # Masked-off lanes load garbage; codes stay in 0..255 and the lanes are zeroed below.
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask)
    mq = tl.load(mq_ptr + offs, mask=mask).to(tl.int32)
    vq = tl.load(vq_ptr + offs, mask=mask).to(tl.int32)
    ma = tl.load(ma_ptr + rows, mask=row_mask)
    va = tl.load(va_ptr + rows, mask=row_mask)
    m = tl.load(tab_ptr + 0 + mq) * ma[:, None]
    v = tl.load(tab_ptr + 256 + vq) * va[:, None]
    if HAS_SCALE:
        g = g * scale
    p = p * decay
    m = m * beta1 + g * om_beta1
    v = v * beta2 + (g * g) * om_beta2
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - tl.div_rn(m, denom) * step_size
    tl.store(p_ptr + offs, p, mask=mask)
    if HAS_COPY:
        store_copy(copy_ptr, offs, p, mask)
    if mask is not None:
        # Lanes past the piece's end (a short last block) must not reach the row's absmax.
        m = tl.where(mask, m, 0.0)
        v = tl.where(mask, v, 0.0)
    requantize(m, mq_ptr, ma_ptr, offs, rows, mask, row_mask, tab_ptr + 512)
    requantize(v, vq_ptr, va_ptr, offs, rows, mask, row_mask, tab_ptr + 768)


@triton.jit
def adamw8bit_kernel(p_ptr, g_ptr, mq_ptr, ma_ptr, vq_ptr, va_ptr, copy_ptr, hyper_ptr, tab_ptr,
                     scale_ptr, inf_ptr, n, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr,
                     HAS_COPY: tl.constexpr, QBLOCK: tl.constexpr, SIZE_CLASS: tl.constexpr,
                     BLOCK: tl.constexpr):
    """p, codes and absmax in place; one program per BLOCK // QBLOCK quantization blocks."""
    go = True
    if HAS_INF:
        go = tl.load(inf_ptr) == 0
    if go:
        scale = 1.0
        if HAS_SCALE:
            scale = tl.load(scale_ptr)
        ROWS: tl.constexpr = BLOCK // QBLOCK
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        offs = rows[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
        end = (tl.program_id(0).to(tl.int64) + 1) * BLOCK
        if end <= n:  # whole tile inside: unmasked, so loads/stores vectorise
            _adamw8bit_tile(p_ptr, g_ptr, mq_ptr, ma_ptr, vq_ptr, va_ptr, copy_ptr, hyper_ptr,
                            tab_ptr, offs, rows, None, None, scale, HAS_SCALE, HAS_COPY)
        else:
            nb = (n + QBLOCK - 1) // QBLOCK
            _adamw8bit_tile(p_ptr, g_ptr, mq_ptr, ma_ptr, vq_ptr, va_ptr, copy_ptr, hyper_ptr,
                            tab_ptr, offs, rows, offs < n, rows < nb, scale, HAS_SCALE,
                            HAS_COPY)


def _configs(qblock: int) -> list[triton.Config]:
    """The shared GPU configs, each tile widened to hold at least one whole block."""
    seen: dict[tuple[int, int], triton.Config] = {}
    for c in GPU_CONFIGS:
        block = max(c.kwargs["BLOCK"], qblock)
        seen.setdefault((block, c.num_warps),
                        triton.Config({"BLOCK": block}, num_warps=c.num_warps))
    return list(seen.values())


_TUNED: dict[int, object] = {}
_INPLACE = ("p_ptr", "mq_ptr", "ma_ptr", "vq_ptr", "va_ptr", "copy_ptr")


def _tuned(qblock: int) -> object:
    """Autotuned kernel for one block size; in-place operands are restored after each config."""
    if qblock not in _TUNED:
        saved: dict[str, torch.Tensor] = {}

        def pre_hook(kwargs: dict, reset_only: bool = False) -> None:
            if not reset_only:
                saved.update({k: kwargs[k].clone() for k in _INPLACE if kwargs.get(k) is not None})

        def post_hook(kwargs: dict, exception: object) -> None:
            for k, v in saved.items():
                kwargs[k].copy_(v)
            saved.clear()

        _TUNED[qblock] = triton.autotune(_configs(qblock), key=["SIZE_CLASS"], pre_hook=pre_hook,
                                         post_hook=post_hook)(adamw8bit_kernel)
    return _TUNED[qblock]


def adamw8bit_update(
    p: torch.Tensor,
    g: torch.Tensor,
    m_codes: torch.Tensor,
    m_absmax: torch.Tensor,
    v_codes: torch.Tensor,
    v_absmax: torch.Tensor,
    *,
    hyper: torch.Tensor,
    tables: torch.Tensor,
    block_size: int,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    model_copy: torch.Tensor | None = None,
) -> None:
    """One AdamW step with uint8 codes and fp32 per-block absmax (zeroshard/quant8.py), in place.

    `hyper`: fp32[8] from quant8.hyper_params; `tables`: fp32[1024] from quant8.kernel_tables;
    `grad_scale`, `found_inf`: 0-d fp32 device tensors. `p` starts at a block boundary.
    """
    n = p.numel()
    nb = -(-n // block_size)
    check_piece("p", p, p)
    check_piece("grad", g, p, GRAD_DTYPES)
    check_piece("m_codes", m_codes, p, (torch.uint8,))
    check_piece("v_codes", v_codes, p, (torch.uint8,))
    check_piece("model_copy", model_copy, p, COPY_DTYPES)
    for name, t in (("m_absmax", m_absmax), ("v_absmax", v_absmax)):
        if t.numel() != nb or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous fp32 with {nb} elements")
    if hyper.numel() != 8 or tables.numel() != 1024:
        raise ValueError("hyper must hold 8 and tables 1024 fp32 values")
    if n == 0:
        return
    args = (p, g, m_codes, m_absmax, v_codes, v_absmax, model_copy, hyper, tables, grad_scale,
            found_inf, n)
    flags = dict(HAS_SCALE=grad_scale is not None, HAS_INF=found_inf is not None,
                 HAS_COPY=model_copy is not None, QBLOCK=block_size)
    if p.is_cuda and not INTERPRET:
        _tuned(block_size)[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](
            *args, SIZE_CLASS=size_class(n), enable_fp_fusion=False, **flags)
    else:
        block = max(INTERPRET_BLOCK, block_size)
        adamw8bit_kernel[(triton.cdiv(n, block),)](*args, SIZE_CLASS=0, BLOCK=block, **flags)

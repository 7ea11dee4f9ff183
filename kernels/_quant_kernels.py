"""The Triton kernels of quant_blockwise.py (format, layout and figures described there).

Each program owns ROWS = BLOCK // QBP whole quantization blocks as a [ROWS, QBP] tile (QB, the
block, padded to QBP, a power of two); `mask` is None for a tile wholly inside n, whose
accesses then vectorise.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import store_copy

# 1.5 * 2**23: (q + MAGIC) - MAGIC rounds |q| < 2**22 half to even, on GPU and interpreter alike
MAGIC = tl.constexpr(12582912.0)


# ---------------------------------------------------------------------------------------------
# tile helpers: `mask` is None for a tile wholly inside n (unmasked: vector accesses)


@triton.jit
def _load_f32(ptr, offs, mask):
    if mask is None:
        return tl.load(ptr + offs).to(tl.float32)
    else:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _byte_offs(rows, n, mask, QB: tl.constexpr, QBP: tl.constexpr):
    """int4: byte offsets of the tile's element pairs and their mask (a byte exists if its
    even element does)."""
    half = tl.arange(0, QBP // 2)
    boffs = rows[:, None] * (QB // 2) + half[None, :]
    if mask is None:
        return boffs, None
    else:
        return boffs, (half[None, :] < QB // 2) & (boffs * 2 < n)


@triton.jit
def _load_codes(ptr, rows, offs, n, mask, BITS: tl.constexpr, QB: tl.constexpr,
                QBP: tl.constexpr, ROWS: tl.constexpr):
    """fp32 codes of the tile (masked lanes 0)."""
    if BITS == 8:
        if mask is None:
            q = tl.load(ptr + offs)
        else:
            q = tl.load(ptr + offs, mask=mask, other=0)
        return q.to(tl.float32)
    else:
        boffs, bmask = _byte_offs(rows, n, mask, QB, QBP)
        if mask is None:
            b = tl.load(ptr + boffs).to(tl.int32)
        else:
            b = tl.load(ptr + boffs, mask=bmask, other=0).to(tl.int32)
        lo = (b << 28) >> 28  # arithmetic shifts sign-extend the nibbles
        hi = (b << 24) >> 28
        return tl.reshape(tl.join(lo, hi), [ROWS, QBP]).to(tl.float32)


@triton.jit
def _load_scales(ptr, rows, n, mask, QB: tl.constexpr):
    if mask is None:
        return tl.load(ptr + rows)
    else:
        return tl.load(ptr + rows, mask=rows * QB < n, other=0.0)


@triton.jit
def _encode(x, rows, offs, n, mask, codes_ptr, scales_ptr, BITS: tl.constexpr,
            QMAXF: tl.constexpr, QB: tl.constexpr, QBP: tl.constexpr, ROWS: tl.constexpr):
    """Store the codes and per-row scales of the fp32 tile `x` (masked lanes hold 0)."""
    # tl.max may drop nan on a GPU (max.f32): a nan in the row sets the scale to nan itself.
    has_nan = tl.max((x != x).to(tl.int32), axis=1) > 0
    scale = tl.div_rn(tl.max(tl.abs(x), axis=1), tl.full([ROWS], QMAXF, tl.float32))
    scale = tl.where(has_nan, float("nan"), scale)
    ok = (scale > 0.0) & (scale < float("inf"))
    q = tl.div_rn(x, tl.where(ok, scale, 1.0)[:, None])
    q = (q + MAGIC) - MAGIC
    q = tl.where(ok[:, None], tl.minimum(tl.maximum(q, -QMAXF), QMAXF), 0.0).to(tl.int32)
    if mask is None:
        tl.store(scales_ptr + rows, scale)
    else:
        tl.store(scales_ptr + rows, scale, mask=rows * QB < n)
    if BITS == 8:
        tl.store(codes_ptr + offs, q.to(tl.int8), mask=mask)
    else:
        lo, hi = tl.split(tl.reshape(q, [ROWS, QBP // 2, 2]))
        byte = ((lo & 0xF) | ((hi & 0xF) << 4)).to(tl.uint8)
        boffs, bmask = _byte_offs(rows, n, mask, QB, QBP)
        tl.store(codes_ptr + boffs, byte, mask=bmask)


@triton.jit
def _tile_mask(rows, n, QB: tl.constexpr, QBP: tl.constexpr):
    cols = tl.arange(0, QBP)
    return (cols[None, :] < QB) & (rows[:, None] * QB + cols[None, :] < n)


@triton.jit
def _tile(n, QB: tl.constexpr, QBP: tl.constexpr, BLOCK: tl.constexpr):
    """This program's rows (blocks), element offsets, and whether it lies wholly inside n."""
    ROWS: tl.constexpr = BLOCK // QBP
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * QB + tl.arange(0, QBP)[None, :]
    full = (pid + 1) * (ROWS * QB) <= n
    if QB != QBP:  # pad lanes in every row: always masked
        full = full & (pid < 0)
    return rows, offs, full


# ---------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _quantize_tile(x_ptr, codes_ptr, scales_ptr, n, rows, offs, mask, BITS: tl.constexpr,
                   QMAXF: tl.constexpr, QB: tl.constexpr, QBP: tl.constexpr,
                   ROWS: tl.constexpr):
    x = _load_f32(x_ptr, offs, mask)
    _encode(x, rows, offs, n, mask, codes_ptr, scales_ptr, BITS, QMAXF, QB, QBP, ROWS)


@triton.jit
def quantize_kernel(x_ptr, codes_ptr, scales_ptr, n, BITS: tl.constexpr, QMAXF: tl.constexpr,
                    QB: tl.constexpr, QBP: tl.constexpr, BLOCK: tl.constexpr):
    """codes, scales of x; one program per BLOCK // QBP blocks."""
    ROWS: tl.constexpr = BLOCK // QBP
    rows, offs, full = _tile(n, QB, QBP, BLOCK)
    if full:
        _quantize_tile(x_ptr, codes_ptr, scales_ptr, n, rows, offs, None, BITS, QMAXF, QB,
                       QBP, ROWS)
    else:
        _quantize_tile(x_ptr, codes_ptr, scales_ptr, n, rows, offs, _tile_mask(rows, n, QB, QBP),
                       BITS, QMAXF, QB, QBP, ROWS)


@triton.jit
def _finish(acc, out_ptr, offs, mask, ACCUMULATE: tl.constexpr):
    if ACCUMULATE:
        acc = _load_f32(out_ptr, offs, mask) + acc
    store_copy(out_ptr, offs, acc, mask)


@triton.jit
def _dequantize_tile(codes_ptr, scales_ptr, out_ptr, n, rows, offs, mask, BITS: tl.constexpr,
                     QB: tl.constexpr, QBP: tl.constexpr, ROWS: tl.constexpr,
                     ACCUMULATE: tl.constexpr):
    q = _load_codes(codes_ptr, rows, offs, n, mask, BITS, QB, QBP, ROWS)
    s = _load_scales(scales_ptr, rows, n, mask, QB)
    _finish(q * s[:, None], out_ptr, offs, mask, ACCUMULATE)


@triton.jit
def dequantize_kernel(codes_ptr, scales_ptr, out_ptr, n, BITS: tl.constexpr,
                      QB: tl.constexpr, QBP: tl.constexpr, ACCUMULATE: tl.constexpr,
                      BLOCK: tl.constexpr):
    """out (+)= codes * scale."""
    ROWS: tl.constexpr = BLOCK // QBP
    rows, offs, full = _tile(n, QB, QBP, BLOCK)
    if full:
        _dequantize_tile(codes_ptr, scales_ptr, out_ptr, n, rows, offs, None, BITS, QB, QBP,
                         ROWS, ACCUMULATE)
    else:
        _dequantize_tile(codes_ptr, scales_ptr, out_ptr, n, rows, offs,
                         _tile_mask(rows, n, QB, QBP), BITS, QB, QBP, ROWS, ACCUMULATE)


@triton.jit
def _row(c_ptr, s_ptr, rows, offs, n, mask, BITS: tl.constexpr, QB: tl.constexpr,
         QBP: tl.constexpr, ROWS: tl.constexpr):
    q = _load_codes(c_ptr, rows, offs, n, mask, BITS, QB, QBP, ROWS)
    return q * _load_scales(s_ptr, rows, n, mask, QB)[:, None]


@triton.jit
def _sum_tile(codes_ptr, scales_ptr, own_ptr, n, k, code_stride, scale_stride, own_row, divisor,
              rows, offs, mask, BITS: tl.constexpr, QB: tl.constexpr, QBP: tl.constexpr,
              ROWS: tl.constexpr, HAS_OWN: tl.constexpr, HAS_DIV: tl.constexpr):
    """fp32 sum over the k rows in row order, 0 + row 0 + row 1 + ... (then / divisor)."""
    acc = tl.zeros([ROWS, QBP], dtype=tl.float32)
    c_ptr = codes_ptr
    s_ptr = scales_ptr
    for r in range(0, k):
        if HAS_OWN:
            if r == own_row:
                acc += _load_f32(own_ptr, offs, mask)
            else:
                acc += _row(c_ptr, s_ptr, rows, offs, n, mask, BITS, QB, QBP, ROWS)
        else:
            acc += _row(c_ptr, s_ptr, rows, offs, n, mask, BITS, QB, QBP, ROWS)
        # pointers step row by row: no 32-bit r * stride product to overflow
        c_ptr += code_stride
        s_ptr += scale_stride
    if HAS_DIV:
        acc = tl.div_rn(acc, tl.zeros_like(acc) + divisor.to(tl.float32))
    return acc


@triton.jit
def dequantize_sum_kernel(codes_ptr, scales_ptr, own_ptr, out_ptr, out_codes_ptr,
                          out_scales_ptr, n, k, code_stride, scale_stride, own_row, divisor,
                          BITS: tl.constexpr, QB: tl.constexpr, QBP: tl.constexpr,
                          HAS_OWN: tl.constexpr, HAS_DIV: tl.constexpr,
                          ACCUMULATE: tl.constexpr, OUT_BITS: tl.constexpr,
                          OUT_QMAXF: tl.constexpr, BLOCK: tl.constexpr):
    """out (+)= sum of k dequantized rows; OUT_BITS > 0: requantize the sum instead."""
    ROWS: tl.constexpr = BLOCK // QBP
    rows, offs, full = _tile(n, QB, QBP, BLOCK)
    if full:
        acc = _sum_tile(codes_ptr, scales_ptr, own_ptr, n, k, code_stride, scale_stride,
                        own_row, divisor, rows, offs, None, BITS, QB, QBP, ROWS, HAS_OWN,
                        HAS_DIV)
        if OUT_BITS == 0:
            _finish(acc, out_ptr, offs, None, ACCUMULATE)
        else:
            _encode(acc, rows, offs, n, None, out_codes_ptr, out_scales_ptr, OUT_BITS,
                    OUT_QMAXF, QB, QBP, ROWS)
    else:
        mask = _tile_mask(rows, n, QB, QBP)
        acc = _sum_tile(codes_ptr, scales_ptr, own_ptr, n, k, code_stride, scale_stride,
                        own_row, divisor, rows, offs, mask, BITS, QB, QBP, ROWS, HAS_OWN,
                        HAS_DIV)
        if OUT_BITS == 0:
            _finish(acc, out_ptr, offs, mask, ACCUMULATE)
        else:
            # a nan scale times a padding code 0 is nan: pad lanes must not reach the absmax
            _encode(tl.where(mask, acc, 0.0), rows, offs, n, mask, out_codes_ptr,
                    out_scales_ptr, OUT_BITS, OUT_QMAXF, QB, QBP, ROWS)

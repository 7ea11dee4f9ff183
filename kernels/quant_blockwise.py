"""Blockwise int8/int4 quantization for ZeRO++'s wire (qwZ all-gather, qgZ reduce-scatter).

Format. A flat tensor of n elements is cut into ceil(n / block) blocks (the last one padded
with zeros, conceptually). Per block: scale = absmax / qmax (fp32, qmax 127 for int8, 7 for
int4), code = round-half-even(x / scale) clamped to [-qmax, qmax], both divisions IEEE-rounded.
int8 codes: one int8 per element. int4 codes: two per uint8, the even element in the low
nibble, the odd one in the high nibble, two's complement nibbles; ceil(n / 2) bytes (an odd
n's last high nibble is 0). A value is codes * scale in fp32.

Special blocks (exactly what comes out):
- all zeros, or absmax / qmax rounding to 0 (absmax below ~8.9e-44 for int8, ~4.9e-45 for
  int4): scale 0, codes 0, and it dequantizes to +0.0. Other subnormal scales are kept, and
  the clamp then matters (checked under the interpreter; a GPU is not checked for them).
- holding a nan: scale nan; else holding ±inf: scale +inf. Every code of such a block is 0, so
  the whole block dequantizes to nan (0 * inf = nan). With `accumulate`, or summed by
  `dequantize_sum`, the nan reaches the output: an overflow survives a quantized reduction and
  the inf/nan skip (a non-finite count) sees it. `requantize_sum` of such a sum: again scale
  nan (or +inf, where an exact `own` row brought an inf), codes 0.

Kernels (_quant_kernels.py). Each program owns ROWS whole blocks as a [ROWS, block] tile
(block padded to a power of two, the pad lanes masked), so a block's absmax is a row maximum
inside one program: no atomics, no second pass, and `requantize_sum` (sum k rows, then
quantize the fp32 sum) is one pass too. One fixed GPU config (4096 elements, 8 warps per
program; larger blocks take one block per program and more warps): the bytes never depend on
the tiling, and no rank's first collective waits on autotuning. The launches disable fp
contraction and divide with div_rn, so every rounding is torch's.

Vector accesses, read from sm_80/sm_90 PTX (tests/test_quant_blockwise.py): in a tile wholly
inside n, with a power-of-two block and 16-byte-aligned pointers, fp32 values move as
ld/st.global.v4.b32 (4 per thread), bf16/fp16 values and int8 codes as v4 too (16 bytes), int4
codes as one v2.b32 (the 8 bytes a thread owns). Scales are one scalar load/store per row. The
last, partial tile and any non-power-of-two block run masked, element by element.
`dequantize_sum` reads rows at one stride: Triton specialises a stride divisible by 16, and
only then are the rows' code loads vectors (a wire message of [codes padded to 16 | scales]
keeps that only if its byte size is a multiple of 16).

Bytes per element moved: quantize reads 4 (fp32) or 2 (bf16/fp16), writes 1 (int8) or 0.5
(int4), plus 4 / block for the scale; dequantize reads the codes and 4 / block, writes the
output (and reads it too with accumulate); dequantize_sum reads k rows of codes (plus `own`)
and writes the output once.

The torch path (`zeroshard/comm/quant_torch.py`, also the wire codec's CPU path;
`backend="auto"` off CUDA, or "torch"; any device) gives the same bytes as the kernels, nan
payloads included (tests check bit equality). Measured on one of our CPU machines
(AMD EPYC, one torch thread, 4M elements, block 256, best of 9 runs on a busy machine; a plain
4M fp32 copy took 0.65 ms): quantize fp32 -> int8 2.3 ms (1.8 G elements/s), -> int4 2.8 ms
(1.5 G/s), bf16 input about the same; dequantize int8 -> fp32 0.8 ms (5.3 G/s), int4 -> fp32
1.8 ms (2.4 G/s), into bf16 with accumulate 2.0 / 2.8 ms; dequantize_sum of 4 rows 4.9 ms
(int8) / 8.3 ms (int4); requantize_sum of 4 rows ~10 ms. It works in chunks of 2^18 elements
(fastest of 2^14..2^23 measured), so its temporaries stay in cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Union

import torch
import triton
from torch import Tensor

from zeroshard.comm.quant_torch import (
    QMAX,
    code_bytes,
    num_blocks,
    torch_dequantize,
    torch_dequantize_sum,
    torch_quantize,
    torch_requantize_sum,
)

from ._common import GRAD_DTYPES, INTERPRET, INTERPRET_BLOCK
from ._quant_kernels import dequantize_kernel, dequantize_sum_kernel, quantize_kernel

Backend = Literal["auto", "triton", "torch"]
Rows = Union[Tensor, Sequence[Tensor]]
MAX_BLOCK = 1 << 16
GPU_TILE = 4096  # elements per program on GPU: 16 per thread at 8 warps

__all__ = ["QMAX", "code_bytes", "num_blocks", "quantize", "dequantize", "dequantize_sum",
           "requantize_sum", "quantize_kernel", "dequantize_kernel", "dequantize_sum_kernel"]


# ---------------------------------------------------------------------------------------------
# launch wrappers


def _check_format(bits: int, block: int) -> None:
    if bits not in QMAX:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if not isinstance(block, int) or not 1 <= block <= MAX_BLOCK or (bits == 4 and block % 2):
        raise ValueError(f"block must be an int in [1, {MAX_BLOCK}] (even for int4), "
                         f"got {block!r}")


def _use_triton(backend: str, device: torch.device) -> bool:
    """'auto': the kernels on CUDA, torch elsewhere (as zeroshard.update chooses); 'triton'
    forces the kernels (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if backend == "auto":
        return device.type == "cuda"
    if backend == "triton":
        if device.type != "cuda" and not INTERPRET:
            raise ValueError("backend='triton' needs CUDA tensors or TRITON_INTERPRET=1")
        return True
    if backend == "torch":
        return False
    raise ValueError(f"unknown backend {backend!r}; expected auto, triton or torch")


def _geometry(block: int, device: torch.device) -> tuple[int, int, int]:
    """(QBP, BLOCK, num_warps): the tile holds BLOCK // QBP whole blocks."""
    qbp = triton.next_power_of_2(block)
    if device.type == "cuda" and not INTERPRET:
        tile = max(GPU_TILE, qbp)
        return qbp, tile, max(8, min(32, tile // 512))
    return qbp, max(INTERPRET_BLOCK, qbp), 4


def _piece(name: str, t: Tensor, numel: int, dtypes: tuple[torch.dtype, ...],
           device: torch.device) -> None:
    if t.numel() != numel or not t.is_contiguous() or t.device != device:
        raise ValueError(f"{name} must be contiguous with {numel} elements on {device}, got "
                         f"{t.numel()} elements on {t.device}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be one of {dtypes}, got {t.dtype}")


def _codes_view(name: str, codes: Tensor, n: int, bits: int, device: torch.device) -> Tensor:
    """int8 or uint8 codes (either dtype accepted: a wire buffer slice is uint8) as int8 for
    int8, uint8 for int4."""
    _piece(name, codes, code_bytes(n, bits), (torch.int8, torch.uint8), device)
    return codes.view(torch.int8 if bits == 8 else torch.uint8)


def quantize(x: Tensor, bits: int, block: int, *, codes_out: Tensor | None = None,
             scales_out: Tensor | None = None, backend: Backend = "auto") -> tuple[Tensor, Tensor]:
    """(codes, fp32 scales) of the contiguous fp32/bf16/fp16 tensor `x`, read as flat.

    codes: int8[n] (bits 8) or uint8[ceil(n / 2)] (bits 4); scales: fp32[ceil(n / block)].
    `codes_out` / `scales_out` receive them in place (e.g. slices of a wire buffer).
    """
    _check_format(bits, block)
    dev, n = x.device, x.numel()
    _piece("x", x, n, GRAD_DTYPES, dev)
    x = x.view(-1)
    codes = codes_out if codes_out is not None else torch.empty(
        code_bytes(n, bits), dtype=torch.int8 if bits == 8 else torch.uint8, device=dev)
    scales = scales_out if scales_out is not None else torch.empty(
        num_blocks(n, block), dtype=torch.float32, device=dev)
    codes = _codes_view("codes_out", codes, n, bits, dev)
    _piece("scales_out", scales, num_blocks(n, block), (torch.float32,), dev)
    if n == 0:
        return codes, scales
    if not _use_triton(backend, dev):
        torch_quantize(x, bits, block, codes, scales)
        return codes, scales
    qbp, tile, warps = _geometry(block, dev)
    quantize_kernel[(triton.cdiv(n, tile // qbp * block),)](
        x, codes, scales, n, BITS=bits, QMAXF=float(QMAX[bits]), QB=block, QBP=qbp, BLOCK=tile,
        **_opts(dev, warps))
    return codes, scales


def _opts(device: torch.device, warps: int) -> dict:
    # no fma contraction: q * scale + acc rounds twice, as torch does
    return {"num_warps": warps, "enable_fp_fusion": False} if device.type == "cuda" and not \
        INTERPRET else {}


def dequantize(codes: Tensor, scales: Tensor, bits: int, block: int, out: Tensor,
               accumulate: bool = False, *, backend: Backend = "auto") -> None:
    """out = codes * scale (fp32 product, rounded once to out's dtype), or out += it with
    `accumulate` (summed in fp32, rounded once). `out`: contiguous fp32/bf16/fp16, n elements."""
    _check_format(bits, block)
    dev, n = out.device, out.numel()
    _piece("out", out, n, GRAD_DTYPES, dev)
    codes = _codes_view("codes", codes, n, bits, dev)
    _piece("scales", scales, num_blocks(n, block), (torch.float32,), dev)
    out = out.view(-1)
    if n == 0:
        return
    if not _use_triton(backend, dev):
        torch_dequantize(codes, scales, bits, block, out, accumulate)
        return
    qbp, tile, warps = _geometry(block, dev)
    dequantize_kernel[(triton.cdiv(n, tile // qbp * block),)](
        codes, scales, out, n, BITS=bits, QB=block, QBP=qbp, ACCUMULATE=bool(accumulate),
        BLOCK=tile, **_opts(dev, warps))


def _rows(name: str, rows: Rows, numel: int, dtypes: tuple[torch.dtype, ...],
          as_dtype: torch.dtype, device: torch.device) -> tuple[list[Tensor], Tensor, int]:
    """The k rows (a [k, numel] tensor or a sequence of flat tensors) as a list, plus a base
    tensor and row stride in elements for the kernel. Rows at one even spacing in one buffer
    (a received all-to-all buffer, wire headers between them included) are read in place;
    others are stacked first (one copy)."""
    if isinstance(rows, Tensor):
        if rows.dim() != 2 or rows.shape[0] < 1:
            raise ValueError(f"{name} must be a [k, m] tensor or a sequence of k >= 1 tensors, "
                             f"got shape {tuple(rows.shape)}")
        rows = list(rows.unbind(0))
    rows = list(rows)
    if not rows:
        raise ValueError(f"{name} holds no rows")
    for i, t in enumerate(rows):
        _piece(f"{name}[{i}]", t, numel, dtypes, device)
    rows = [t.view(as_dtype) for t in rows]
    size = rows[0].element_size()
    gaps = {b.data_ptr() - a.data_ptr() for a, b in zip(rows, rows[1:])}
    stride = gaps.pop() if len(gaps) == 1 else 0 if len(rows) == 1 else -1
    one_buffer = len({t.untyped_storage().data_ptr() for t in rows}) == 1
    if one_buffer and stride >= 0 and stride % size == 0:
        return rows, rows[0], stride // size
    return rows, torch.stack(rows), numel


def _sum_args(codes: Rows, scales: Rows, bits: int, block: int, n: int, device: torch.device,
              own: Tensor | None, own_row: int, divisor: int | None):
    _check_format(bits, block)
    c_rows, c_base, c_stride = _rows("codes", codes, code_bytes(n, bits),
                                     (torch.int8, torch.uint8),
                                     torch.int8 if bits == 8 else torch.uint8, device)
    s_rows, s_base, s_stride = _rows("scales", scales, num_blocks(n, block), (torch.float32,),
                                     torch.float32, device)
    k = len(c_rows)
    if len(s_rows) != k:
        raise ValueError(f"{k} rows of codes but {len(s_rows)} rows of scales")
    if own is not None:
        _piece("own", own, n, GRAD_DTYPES, device)
        if not 0 <= own_row < k:
            raise ValueError(f"own_row must be in [0, {k}), got {own_row}")
    if divisor is not None and (not isinstance(divisor, int) or divisor < 1):
        raise ValueError(f"divisor must be a positive int, got {divisor!r}")
    return c_rows, s_rows, (c_base, s_base, own, k, c_stride, s_stride, own_row,
                            divisor or 1), dict(HAS_OWN=own is not None,
                                                HAS_DIV=divisor not in (None, 1))


def dequantize_sum(codes: Rows, scales: Rows, bits: int, block: int, out: Tensor,
                   accumulate: bool = False, *, own: Tensor | None = None, own_row: int = -1,
                   divisor: int | None = None, backend: Backend = "auto") -> None:
    """out = (sum over rows r = 0..k-1 of codes[r] * scales[r]) / divisor, in one pass.

    The sum is fp32, in row order starting from +0.0, so it does not depend on the tiling or
    on when each row arrived; it is rounded once into out (fp32/bf16/fp16, n elements), or
    added to out in fp32 with `accumulate`. `codes`: [k, code_bytes] or k flat tensors;
    `scales`: [k, nblocks] fp32 or k flat tensors. `own` (n values of any float dtype) stands
    in for row `own_row`, whose codes and scales are not read: a rank's exact own chunk in
    qgZ. `divisor` (a positive int, e.g. the world size) divides the sum, IEEE-rounded.
    """
    dev, n = out.device, out.numel()
    _piece("out", out, n, GRAD_DTYPES, dev)
    c_rows, s_rows, args, flags = _sum_args(codes, scales, bits, block, n, dev, own, own_row,
                                            divisor)
    out = out.view(-1)
    if n == 0:
        return
    if not _use_triton(backend, dev):
        torch_dequantize_sum(c_rows, s_rows, bits, block, out, accumulate, own, own_row,
                             divisor)
        return
    c_base, s_base, own_t, *ints = args
    qbp, tile, warps = _geometry(block, dev)
    dequantize_sum_kernel[(triton.cdiv(n, tile // qbp * block),)](
        c_base, s_base, own_t, out, None, None, n, *ints, BITS=bits, QB=block, QBP=qbp,
        ACCUMULATE=bool(accumulate), OUT_BITS=0, OUT_QMAXF=0.0, BLOCK=tile, **flags,
        **_opts(dev, warps))


def requantize_sum(codes: Rows, scales: Rows, bits: int, block: int, n: int, *,
                   out_bits: int | None = None, own: Tensor | None = None, own_row: int = -1,
                   divisor: int | None = None, codes_out: Tensor | None = None,
                   scales_out: Tensor | None = None,
                   backend: Backend = "auto") -> tuple[Tensor, Tensor]:
    """quantize(dequantize_sum(...), out_bits or bits, block) in one pass: the fp32 sum is
    never stored. Same arguments as `dequantize_sum` (n: the elements per row); returns
    (codes, scales) exactly as `quantize` of the fp32 sum would."""
    out_bits = bits if out_bits is None else out_bits
    _check_format(out_bits, block)
    dev = scales.device if isinstance(scales, Tensor) else scales[0].device
    c_rows, s_rows, args, flags = _sum_args(codes, scales, bits, block, n, dev, own, own_row,
                                            divisor)
    oc = codes_out if codes_out is not None else torch.empty(
        code_bytes(n, out_bits), dtype=torch.int8 if out_bits == 8 else torch.uint8, device=dev)
    os_ = scales_out if scales_out is not None else torch.empty(
        num_blocks(n, block), dtype=torch.float32, device=dev)
    oc = _codes_view("codes_out", oc, n, out_bits, dev)
    _piece("scales_out", os_, num_blocks(n, block), (torch.float32,), dev)
    if n == 0:
        return oc, os_
    if not _use_triton(backend, dev):
        torch_requantize_sum(c_rows, s_rows, bits, block, n, oc, os_, out_bits, own, own_row,
                             divisor)
        return oc, os_
    c_base, s_base, own_t, *ints = args
    qbp, tile, warps = _geometry(block, dev)
    dequantize_sum_kernel[(triton.cdiv(n, tile // qbp * block),)](
        c_base, s_base, own_t, None, oc, os_, n, *ints, BITS=bits, QB=block, QBP=qbp,
        ACCUMULATE=False, OUT_BITS=out_bits, OUT_QMAXF=float(QMAX[out_bits]), BLOCK=tile,
        **flags, **_opts(dev, warps))
    return oc, os_

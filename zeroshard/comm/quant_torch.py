"""Blockwise int8/int4 quantization in torch: the same bytes as the Triton kernels of
`zeroshard_kernels.quant_blockwise`, on any device. It is their torch backend and the CPU
path of comm/quantized.py (the wire codec), one implementation for both (the core never
imports triton).

Works through the tensor in chunks of whole blocks (CHUNK elements) so the fp32 temporaries stay
in cache and no tensor-sized scratch is allocated; every operation is elementwise or a per-block
reduction in the order the kernels use (see quant_blockwise.py for the format).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

QMAX = {8: 127, 4: 7}
CHUNK = 1 << 18  # elements per step: 1 MiB fp32 temporaries (fastest of 2^14..2^23 measured)


def code_bytes(n: int, bits: int) -> int:
    """Bytes of codes for `n` elements: n for int8, ceil(n / 2) for int4."""
    return n if bits == 8 else (n + 1) // 2


def num_blocks(n: int, block: int) -> int:
    return -(-n // block)


def _step(block: int) -> int:
    """Chunk length: whole blocks, and even (an int4 chunk starts on a byte)."""
    return max(2 * block, CHUNK // (2 * block) * 2 * block)


def _as_blocks(v: Tensor, block: int) -> Tensor:
    """[blocks, block] fp32 view/copy of a chunk, the last block zero-padded."""
    m = v.numel()
    nb = num_blocks(m, block)
    if nb * block == m:
        return v.view(nb, block)
    pad = torch.zeros(nb * block, dtype=v.dtype, device=v.device)
    pad[:m] = v
    return pad.view(nb, block)


def _encode_chunk(xb: Tensor, bits: int, scales: Tensor) -> Tensor:
    """int8 codes [blocks * block] of fp32 blocks `xb`; writes the blocks' scales."""
    qmax = QMAX[bits]
    torch.div(xb.abs().amax(dim=1), qmax, out=scales)  # amax propagates nan
    ok = (scales > 0) & (scales < float("inf"))
    if bool(ok.all()):  # the usual case; masking costs more than the rest together
        q = (xb / scales[:, None]).round_()
    else:
        q = (xb / torch.where(ok, scales, 1.0)[:, None]).round_()
        q.masked_fill_(~ok[:, None], 0.0)
    # only a subnormal scale (absmax < 2^-119) lets |x / scale| pass qmax + 0.5
    return q.clamp_(-qmax, qmax).view(-1).to(torch.int8)


def _encode_store(v: Tensor, bits: int, block: int, s: int, codes: Tensor,
                  scales: Tensor) -> None:
    """Codes and scales of the fp32 chunk `v` (elements [s, s + len(v)), s a block start)."""
    m, b0 = v.numel(), s // block
    xb = _as_blocks(v, block)
    q = _encode_chunk(xb, bits, scales[b0 : b0 + xb.shape[0]])[:m]
    if bits == 8:
        codes[s : s + m].copy_(q)
    else:
        codes[s // 2 : (s + m + 1) // 2].copy_(_pack4(q))


def _pack4(q: Tensor) -> Tensor:
    """Two int4 codes per byte: even element low nibble, odd element high nibble."""
    if q.numel() % 2:
        q = torch.cat([q, q.new_zeros(1)])
    w = q.view(torch.int16)  # little-endian: the even element is the low byte
    return ((w & 0xF) | ((w >> 4) & 0xF0)).to(torch.uint8)


def _unpack(codes: Tensor, bits: int, start: int, m: int) -> Tensor:
    """fp32 codes of elements [start, start + m) (start even)."""
    if bits == 8:
        return codes[start : start + m].view(torch.int8).float()
    b = codes[start // 2 : (start + m + 1) // 2].view(torch.int8)
    q = torch.empty(b.numel(), 2, dtype=torch.float32, device=b.device)
    q[:, 0].copy_((b << 4) >> 4)  # int8 arithmetic shifts sign-extend the nibbles
    q[:, 1].copy_(b >> 4)
    return q.view(-1)[:m]


def _deq_chunk(codes: Tensor, scales: Tensor, bits: int, block: int, start: int, m: int,
               out: Tensor | None = None) -> Tensor:
    """fp32 values of elements [start, start + m), into `out` (fp32, m) if given."""
    q = _unpack(codes, bits, start, m)
    b0 = start // block
    full = (m // block) * block
    out = torch.empty(m, dtype=torch.float32, device=q.device) if out is None else out
    if full:
        torch.mul(q[:full].view(-1, block), scales[b0 : b0 + full // block, None],
                  out=out[:full].view(-1, block))
    if full < m:
        torch.mul(q[full:], scales[b0 + full // block], out=out[full:])
    return out


def _store(out: Tensor, v: Tensor, accumulate: bool) -> None:
    # add_ of fp32 into bf16/fp16 sums in fp32 and rounds once, as the kernels do.
    if accumulate:
        out.add_(v)
    else:
        out.copy_(v)


def torch_quantize(x: Tensor, bits: int, block: int, codes: Tensor, scales: Tensor) -> None:
    """codes/scales (preallocated, see quant_blockwise.quantize) of the flat tensor `x`."""
    n = x.numel()
    step = _step(block)
    for s in range(0, n, step):
        m = min(step, n - s)
        _encode_store(x[s : s + m].float(), bits, block, s, codes, scales)


def torch_dequantize(codes: Tensor, scales: Tensor, bits: int, block: int, out: Tensor,
                     accumulate: bool) -> None:
    n = out.numel()
    step = _step(block)
    for s in range(0, n, step):
        m = min(step, n - s)
        piece = out[s : s + m]
        if out.dtype == torch.float32 and not accumulate:
            _deq_chunk(codes, scales, bits, block, s, m, out=piece)
        else:
            _store(piece, _deq_chunk(codes, scales, bits, block, s, m), accumulate)


def torch_sum_chunk(codes: Sequence[Tensor], scales: Sequence[Tensor], bits: int, block: int,
                    s: int, m: int, own: Tensor | None, own_row: int,
                    divisor: int | None) -> Tensor:
    """fp32 sum in row order of rows' elements [s, s + m) (row `own_row` taken from `own`)."""
    dev = scales[0].device
    acc = torch.empty(m, dtype=torch.float32, device=dev)
    tmp = torch.empty(m, dtype=torch.float32, device=dev) if len(codes) > 1 else acc
    for r, (c, sc) in enumerate(zip(codes, scales)):
        if own is not None and r == own_row:
            if r == 0:
                acc.zero_()  # +0.0 + own: a -0.0 in own becomes +0.0, as in the kernel
            acc.add_(own[s : s + m])
        elif r == 0:  # +0.0 + v is v bit for bit here: a dequantized value is never -0.0
            _deq_chunk(c, sc, bits, block, s, m, out=acc)
        else:
            acc.add_(_deq_chunk(c, sc, bits, block, s, m, out=tmp))
    if divisor is not None:
        acc.div_(divisor)
    return acc


def torch_dequantize_sum(codes: Sequence[Tensor], scales: Sequence[Tensor], bits: int,
                         block: int, out: Tensor, accumulate: bool, own: Tensor | None,
                         own_row: int, divisor: int | None) -> None:
    n = out.numel()
    step = _step(block)
    for s in range(0, n, step):
        m = min(step, n - s)
        acc = torch_sum_chunk(codes, scales, bits, block, s, m, own, own_row, divisor)
        _store(out[s : s + m], acc, accumulate)


def torch_requantize_sum(codes: Sequence[Tensor], scales: Sequence[Tensor], bits: int,
                         block: int, n: int, out_codes: Tensor, out_scales: Tensor,
                         out_bits: int, own: Tensor | None, own_row: int,
                         divisor: int | None) -> None:
    step = _step(block)
    for s in range(0, n, step):
        m = min(step, n - s)
        acc = torch_sum_chunk(codes, scales, bits, block, s, m, own, own_row, divisor)
        _encode_store(acc, out_bits, block, s, out_codes, out_scales)

"""Blockwise int8/int4 quantization for the wire (ZeRO++'s qwZ and qgZ).

Symmetric absmax per block of `block` elements: scale = absmax / qmax (127 for int8, 7 for
int4), code = round-half-even(x / scale) clamped to [-qmax, qmax]; a block of zeros has scale
0 and codes 0. int8 codes are one byte per element; int4 codes pack two per byte (the even
element in the low nibble, two's complement). A block holding inf or nan gets a non-finite
scale (absmax is inf or nan) and codes 0, so it dequantizes to non-finite values: an overflow
survives a quantized reduction and the step is skipped as it would be without quantization.

`quantize` / `dequantize` run torch on CPU (and on the meta device, for the estimator) and
the fused Triton kernels of `zeroshard_kernels.quant_blockwise` on CUDA, which produce the same
bytes. `BlockwiseWire` packs codes and scales into one byte tensor, the form a collective
sends: [codes, padded to 16 bytes | fp32 scales].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

QMAX = {8: 127, 4: 7}


def _check(bits: int, block: int) -> None:
    if bits not in QMAX:
        raise ValueError(f"quantization bits must be 8 or 4, got {bits}")
    if block < 2 or block % 2:
        raise ValueError(f"quantization block must be an even number >= 2, got {block}")


def code_bytes(numel: int, bits: int) -> int:
    return numel if bits == 8 else (numel + 1) // 2


def num_blocks(numel: int, block: int) -> int:
    return math.ceil(numel / block)


def _use_triton(t: Tensor) -> bool:
    return t.is_cuda


def quantize(x: Tensor, bits: int, block: int) -> tuple[Tensor, Tensor]:
    """(codes, fp32 scales) of the 1-D tensor `x`."""
    _check(bits, block)
    x = x.reshape(-1)
    if _use_triton(x):
        from zeroshard_kernels.quant_blockwise import quantize as triton_quantize

        return triton_quantize(x, bits, block)
    n, nb = x.numel(), num_blocks(x.numel(), block)
    if x.is_meta:
        return (torch.empty(code_bytes(n, bits), dtype=torch.int8 if bits == 8 else torch.uint8,
                            device=x.device),
                torch.empty(nb, dtype=torch.float32, device=x.device))  # fmt: skip
    xb = F.pad(x.float(), (0, nb * block - n)).view(nb, block)
    scales = xb.abs().amax(dim=1) / QMAX[bits]
    q = torch.where(scales[:, None] > 0, xb / scales[:, None], 0.0)
    q = torch.nan_to_num(q.round_(), nan=0.0, posinf=0.0, neginf=0.0)
    q = q.clamp_(-QMAX[bits], QMAX[bits]).to(torch.int8).view(-1)[:n]
    if bits == 8:
        return q, scales
    if n % 2:
        q = F.pad(q, (0, 1))
    pairs = q.view(-1, 2).view(torch.uint8)
    return (pairs[:, 0] & 0xF) | ((pairs[:, 1] & 0xF) << 4), scales


def dequantize(codes: Tensor, scales: Tensor, bits: int, block: int, out: Tensor,
               accumulate: bool = False) -> None:  # fmt: skip
    """`out` (any float dtype, `n` elements) = codes * scale, or += with `accumulate`."""
    _check(bits, block)
    if _use_triton(out):
        from zeroshard_kernels.quant_blockwise import dequantize as triton_dequantize

        triton_dequantize(codes, scales, bits, block, out, accumulate=accumulate)
        return
    if out.is_meta:
        return
    n = out.numel()
    if bits == 8:
        q = codes.view(torch.int8).float()
    else:
        b = codes.view(torch.uint8).to(torch.int16)
        nibbles = torch.stack([b & 0xF, (b >> 4) & 0xF], dim=1).view(-1)
        q = (nibbles - 16 * (nibbles >= 8)).float()
    nb = scales.numel()
    q = F.pad(q[:n], (0, nb * block - n)).view(nb, block) * scales[:, None]
    values = q.view(-1)[:n].view(out.shape)
    if accumulate:
        out.add_(values)
    else:
        out.copy_(values)


class BlockwiseWire:
    """A `WireCodec` (comm/collectives.py) sending blockwise int8/int4 codes with fp32 scales:
    for all-gather and broadcast (codes cannot be summed on the wire)."""

    reducible = False

    def __init__(self, bits: int = 8, block: int = 256) -> None:
        _check(bits, block)
        self.bits, self.block = bits, block

    def __repr__(self) -> str:
        return f"BlockwiseWire(bits={self.bits}, block={self.block})"

    def _codes_padded(self, numel: int) -> int:
        return -(-code_bytes(numel, self.bits) // 16) * 16

    def wire_bytes(self, numel: int) -> int:
        """Bytes that `numel` elements take on the wire."""
        return self._codes_padded(numel) + 4 * num_blocks(numel, self.block)

    def encode(self, t: Tensor) -> Tensor:
        codes, scales = quantize(t.reshape(-1), self.bits, self.block)
        wire = torch.empty(self.wire_bytes(t.numel()), dtype=torch.uint8, device=t.device)
        if not t.is_meta:
            cb = self._codes_padded(t.numel())
            wire[: codes.numel()].copy_(codes.view(torch.uint8))
            wire[codes.numel() : cb].zero_()
            wire[cb:].view(torch.float32).copy_(scales)
        return wire

    def decode(self, wire: Tensor, out: Tensor, accumulate: bool = False) -> None:
        """`out` = the values `wire` encodes (`accumulate`: out += them)."""
        n = out.numel()
        cb = self._codes_padded(n)
        codes = wire[: code_bytes(n, self.bits)]
        scales = wire[cb : cb + 4 * num_blocks(n, self.block)].view(torch.float32)
        dequantize(codes, scales, self.bits, self.block, out.view(-1), accumulate=accumulate)

"""Blockwise int8/int4 quantization for the wire (ZeRO++'s qwZ and qgZ).

Symmetric absmax per block of `block` elements: scale = absmax / qmax (127 for int8, 7 for
int4), code = round-half-even(x / scale) clamped to [-qmax, qmax]; a block of zeros has scale
0 and codes 0. int8 codes are one byte per element; int4 codes pack two per byte (the even
element in the low nibble, two's complement). A block holding inf or nan gets a non-finite
scale (absmax is inf or nan) and codes 0, so it dequantizes to non-finite values: an overflow
survives a quantized reduction and the step is skipped as it would be without quantization.

`quantize` / `dequantize` run comm/quant_torch.py on CPU (and only allocate on the meta
device, for the estimator) and the fused Triton kernels of `zeroshard_kernels.quant_blockwise`
on CUDA, which produce the same bytes. `BlockwiseWire` packs codes and scales into one byte
tensor, the form a collective sends: [codes, padded to 16 bytes | fp32 scales].
"""

from __future__ import annotations

import torch
from torch import Tensor

from zeroshard.comm.quant_torch import (
    QMAX,
    code_bytes,
    num_blocks,
    torch_dequantize,
    torch_quantize,
)


def _check(bits: int, block: int) -> None:
    if bits not in QMAX:
        raise ValueError(f"quantization bits must be 8 or 4, got {bits}")
    if block < 2 or block % 2:
        raise ValueError(f"quantization block must be an even number >= 2, got {block}")


def _use_triton(t: Tensor) -> bool:
    return t.is_cuda


def quantize(x: Tensor, bits: int, block: int) -> tuple[Tensor, Tensor]:
    """(codes, fp32 scales) of the 1-D tensor `x`."""
    _check(bits, block)
    x = x.reshape(-1)
    if _use_triton(x):
        from zeroshard_kernels.quant_blockwise import quantize as triton_quantize

        return triton_quantize(x, bits, block)
    n = x.numel()
    codes = torch.empty(code_bytes(n, bits), dtype=torch.int8 if bits == 8 else torch.uint8,
                        device=x.device)  # fmt: skip
    scales = torch.empty(num_blocks(n, block), dtype=torch.float32, device=x.device)
    if not x.is_meta:
        torch_quantize(x, bits, block, codes, scales)
    return codes, scales


def dequantize(codes: Tensor, scales: Tensor, bits: int, block: int, out: Tensor,
               accumulate: bool = False) -> None:  # fmt: skip
    """`out` (any float dtype, `n` elements) = codes * scale, or += with `accumulate`."""
    _check(bits, block)
    if _use_triton(out):
        from zeroshard_kernels.quant_blockwise import dequantize as triton_dequantize

        triton_dequantize(codes, scales, bits, block, out, accumulate=accumulate)
        return
    if not out.is_meta:
        torch_dequantize(codes, scales, bits, block, out.view(-1), accumulate)


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

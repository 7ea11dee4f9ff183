"""The 8-bit state format: the two dynamic maps, the rounding, the blockwise (de)quantizer.

Each state is one uint8 code per element plus one fp32 absmax per block of `block_size`
contiguous elements; element i of a block holds `qmap[code[i]] * absmax`. Blocks start at
multiples of `block_size` in a parameter's global element index; a parameter's last block may be
short. The rounding is defined in the package docstring (zeroshard/quant8/__init__.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BLOCK_SIZE = 256
MIN_8BIT_SIZE = 4096
#: State tensors of one 8-bit piece: codes (uint8, one per element), absmax (fp32, per block).
STATE_NAMES = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")
_BITS_SHIFT = 15  # x's fp32 bits >> 15: sign, 8 exponent bits, 8 mantissa bits
_BUCKETS = 1 << (32 - _BITS_SHIFT)

_MAPS: dict[bool, Tensor] = {}
_TABLES: dict[tuple[bool, torch.device], tuple[Tensor, Tensor]] = {}
_KERNEL_TABLES: dict[torch.device, Tensor] = {}
_SCRATCH: dict[torch.device, dict[str, Tensor]] = {}


# --------------------------------------------------------------------------------------------
# the two maps


def dynamic_map(signed: bool) -> Tensor:
    """The 256 sorted fp32 values of the dynamic map (7 exponent bits), as bitsandbytes builds it.

    Decade j = 0..6 covers [0.1, 1] * 10^(j-6): the midpoints of a linspace(0.1, 1) with
    2^j + 1 points (signed: mirrored negative too) or 2^(j+1) + 1 points (unsigned), each
    scaled in fp32 by the decade's power of ten; then 0 and 1.0. Signed: 127 negatives, 0,
    127 positives and 1.0 (no -1.0); unsigned: 0, 254 positives and 1.0.
    """
    cached = _MAPS.get(signed)
    if cached is not None:
        return cached
    values: list[float] = []
    for j in range(7):
        points = 2 ** j + 1 if signed else 2 ** (j + 1) + 1
        edges = torch.linspace(0.1, 1, points)
        centres = (edges[:-1] + edges[1:]) / 2.0
        # Python's power of ten times an fp32 tensor: fp32 products, as bitsandbytes gets them.
        scaled = (10 ** (j - 6)) * centres
        values += scaled.tolist()
        if signed:
            values += (-(10 ** (j - 6)) * centres).tolist()
    values += [0.0, 1.0]
    out = torch.tensor(sorted(values), dtype=torch.float32)
    if out.numel() != 256 or not bool((out[1:] > out[:-1]).all()):
        raise AssertionError("dynamic map must hold 256 distinct sorted values")
    _MAPS[signed] = out
    return out


def midpoints(signed: bool) -> Tensor:
    """256 fp32 decision points: mid[k] = fp32((map[k] + map[k+1]) * 0.5) for k < 255, +inf."""
    q = dynamic_map(signed)
    mid = torch.empty(256, dtype=torch.float32)
    mid[:255] = (q[:-1] + q[1:]) * 0.5
    mid[255] = math.inf
    return mid


def zero_code(signed: bool) -> int:
    """The code of 0.0 (signed map: 127, unsigned: 0); fresh states hold it."""
    return int(torch.nonzero(dynamic_map(signed) == 0)[0])


def _bucket_tables(signed: bool, device: torch.device) -> tuple[Tensor, Tensor]:
    """(base uint8, thr fp32) indexed by fp32 bits >> 15: code = base + (thr < x).

    base counts the midpoints below the smallest float of the bucket; thr is the bucket's one
    midpoint (or +inf). Checked here: no bucket holds two midpoints.
    """
    key = (signed, device)
    if key in _TABLES:
        return _TABLES[key]
    mid = midpoints(signed)[:255]
    idx = torch.arange(_BUCKETS, dtype=torch.int64)
    low_bits = idx << _BITS_SHIFT
    # The smallest real in a bucket: its lowest bit pattern if positive, its highest if negative.
    low_bits = torch.where(idx >= _BUCKETS // 2, low_bits | ((1 << _BITS_SHIFT) - 1), low_bits)
    low = low_bits.to(torch.int32).view(torch.float32)  # wraps into the sign bit as intended
    base = torch.bucketize(low, mid, right=False)  # count of mid < low (NaN buckets: unused)
    mid_bucket = (mid.view(torch.int32).to(torch.int64) & 0xFFFFFFFF) >> _BITS_SHIFT
    if mid_bucket.unique().numel() != mid_bucket.numel():
        raise AssertionError("a quantization bucket holds two midpoints")
    thr = torch.full((_BUCKETS,), math.inf, dtype=torch.float32)
    thr[mid_bucket] = mid
    tables = (base.clamp(max=255).to(torch.uint8).to(device), thr.to(device))
    _TABLES[key] = tables
    return tables


def kernel_tables(device: torch.device) -> Tensor:
    """fp32[1024] for the Triton kernel: signed map, unsigned map, signed mids, unsigned mids."""
    t = _KERNEL_TABLES.get(device)
    if t is None:
        t = torch.cat([dynamic_map(True), dynamic_map(False), midpoints(True),
                       midpoints(False)]).to(device)
        _KERNEL_TABLES[device] = t
    return t


# --------------------------------------------------------------------------------------------
# layout, sizes, state


def num_blocks(n: int, block_size: int = BLOCK_SIZE) -> int:
    """Blocks covering n elements (the last one may be short)."""
    return -(-n // block_size)


def block_slice(first: int, n: int, block_size: int = BLOCK_SIZE) -> slice:
    """The parameter's absmax entries covering its elements [first, first + n).

    `first` must be a block boundary: a piece of codes and its absmax then move between ranks,
    stages and checkpoints as they are, never requantized.
    """
    if first % block_size:
        raise ValueError(f"piece starts at element {first}, not a multiple of {block_size}")
    return slice(first // block_size, first // block_size + num_blocks(n, block_size))


def uses_8bit(global_numel: int, min_8bit_size: int = MIN_8BIT_SIZE) -> bool:
    """8-bit states iff the parameter's global element count (never a shard's) reaches the
    threshold: the choice, and so the numerics, cannot depend on the world size."""
    return global_numel >= min_8bit_size


def state_bytes(global_numel: int, block_size: int = BLOCK_SIZE,
                min_8bit_size: int = MIN_8BIT_SIZE) -> int:
    """Bytes of exp_avg + exp_avg_sq for one whole parameter: 2 per element + 8 per block, or
    8 per element under the fp32 fallback."""
    if not uses_8bit(global_numel, min_8bit_size):
        return 8 * global_numel
    return 2 * global_numel + 8 * num_blocks(global_numel, block_size)


def check_block_size(block_size: int) -> None:
    # Power of two: the kernel tiles a block with tl.arange.
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")


def init_state8(n: int, block_size: int = BLOCK_SIZE,
                device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Zero states for a piece of n elements: codes of 0.0 and zero absmax (STATE_NAMES)."""
    check_block_size(block_size)
    nb = num_blocks(n, block_size)
    return {
        "exp_avg_codes": torch.full((n,), zero_code(True), dtype=torch.uint8, device=device),
        "exp_avg_absmax": torch.zeros(nb, dtype=torch.float32, device=device),
        "exp_avg_sq_codes": torch.full((n,), zero_code(False), dtype=torch.uint8, device=device),
        "exp_avg_sq_absmax": torch.zeros(nb, dtype=torch.float32, device=device),
    }


# --------------------------------------------------------------------------------------------
# quantize / dequantize (CPU torch ops, any device)


def quant_scratch(device: torch.device, name: str, numel: int, dtype: torch.dtype) -> Tensor:
    bufs = _SCRATCH.setdefault(device, {})
    buf = bufs.get(name)
    if buf is None or buf.numel() < numel or buf.dtype != dtype:
        buf = torch.empty(numel, dtype=dtype, device=device)
        bufs[name] = buf
    return buf[:numel]


def requantize(s: Tensor, k: int, block_size: int, signed: bool, codes: Tensor,
                absmax: Tensor, tmp: Tensor, idx: Tensor, flag: Tensor) -> None:
    """codes[:k], absmax <- quantized s[:k]; s is zero-padded to whole blocks; tmp like s."""
    nb = absmax.numel()
    s2 = s.view(nb, block_size)
    torch.abs(s, out=tmp)
    torch.amax(tmp.view(nb, block_size), dim=1, out=absmax)
    den = torch.where(absmax > 0, absmax, torch.ones((), dtype=absmax.dtype, device=s.device))
    torch.div(s2, den[:, None], out=tmp.view(nb, block_size))
    x = tmp[:k]
    base, thr = _bucket_tables(signed, s.device)
    torch.bitwise_right_shift(x.view(torch.int32), _BITS_SHIFT, out=idx)
    idx.bitwise_and_(_BUCKETS - 1)  # arithmetic shift sign-extends: keep the 17 bits
    torch.index_select(base, 0, idx, out=codes)
    thr_x = s[:k]  # s is consumed: reuse it for the thresholds
    torch.index_select(thr, 0, idx, out=thr_x)
    torch.lt(thr_x, x, out=flag)
    codes.add_(flag)


def dequantize_into(out: Tensor, k: int, block_size: int, signed: bool, codes: Tensor,
                     absmax: Tensor, idx: Tensor) -> None:
    """out[:k] <- map[codes] * absmax; out[k:] (block padding) <- 0."""
    qmap = dynamic_map(signed).to(out.device)
    idx.copy_(codes)
    torch.index_select(qmap, 0, idx, out=out[:k])
    out[k:].zero_()
    out.view(absmax.numel(), block_size).mul_(absmax[:, None])


def quantize_blockwise(x: Tensor, signed: bool, block_size: int = BLOCK_SIZE
                       ) -> tuple[Tensor, Tensor]:
    """(uint8 codes, fp32 absmax per block) of a flat fp32 tensor, by the rounding above."""
    check_block_size(block_size)
    n = x.numel()
    nb = num_blocks(n, block_size)
    padded = torch.zeros(nb * block_size, dtype=torch.float32, device=x.device)
    padded[:n] = x.reshape(-1)
    codes = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nb, dtype=torch.float32, device=x.device)
    requantize(padded, n, block_size, signed, codes, absmax, torch.empty_like(padded),
                torch.empty(n, dtype=torch.int32, device=x.device),
                torch.empty(n, dtype=torch.bool, device=x.device))
    return codes, absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, signed: bool,
                         block_size: int = BLOCK_SIZE) -> Tensor:
    """fp32 values map[codes] * absmax of a flat piece."""
    check_block_size(block_size)
    n = codes.numel()
    out = torch.empty(absmax.numel() * block_size, dtype=torch.float32, device=codes.device)
    dequantize_into(out, n, block_size, signed, codes.reshape(-1), absmax,
                     torch.empty(n, dtype=torch.int32, device=codes.device))
    return out[:n]


def dequantize_span(codes: Tensor, absmax: Tensor, signed: bool, block_size: int,
                    first: int = 0) -> Tensor:  # fmt: skip
    """fp32 map[codes] * absmax of a run of elements that starts `first` elements into the
    first block `absmax` covers: a piece cut anywhere (an fp32-state layout loading 8-bit
    states). Each value is the same fp32 product `dequantize_blockwise` forms."""
    check_block_size(block_size)
    n = codes.numel()
    if not 0 <= first < block_size or absmax.numel() != num_blocks(first + n, block_size):
        raise ValueError(f"{absmax.numel()} absmax entries do not cover {n} elements "
                         f"starting {first} into a block of {block_size}")  # fmt: skip
    qmap = dynamic_map(signed).to(codes.device)
    scale = absmax.to(codes.device).repeat_interleave(block_size)[first : first + n]
    return qmap[codes.reshape(-1).long()] * scale

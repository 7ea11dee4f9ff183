"""Blockwise 8-bit AdamW states: the format, its quantizer and the fused CPU step.

Format (docs/adamw8bit.md): each state is one uint8 code per element plus one fp32 absmax per
block of `block_size` contiguous elements; element i of a block holds
`qmap[code[i]] * absmax`. `exp_avg` uses the signed dynamic map, `exp_avg_sq` the unsigned one
(both built as bitsandbytes' `create_dynamic_map` builds them). Blocks start at multiples of
`block_size` in a parameter's global element index, so they never depend on the world size; a
parameter's last block may be short.

Rounding (identical on every backend, defined by value, not by algorithm):
    x    = s / absmax       (IEEE fp32 division; absmax 0 -> divide by 1, all s are 0 then)
    code = #{k : mid[k] < x}  with mid[k] = fp32((qmap[k] + qmap[k+1]) * 0.5), k < 255
i.e. the nearest map value, a tie on a midpoint going to the lower code. The Triton kernel finds
the count by binary search over `mid`; the CPU path by a 2^17-entry table indexed by the top 17
bits of x (each bucket holds at most one midpoint, so one comparison finishes the count).

The step (`adamw8bit_step_`): every operation in fp32, each rounded once, in this order:
    g = fp32(grad) [* grad_scale];  m = qmap_s[mc] * ma;  v = qmap_u[vc] * va
    p = p * decay                                      (decay = 1 - lr * weight_decay)
    m = m * beta1 + g * (1 - beta1);  v = v * beta2 + (g * g) * (1 - beta2)
    p = p - (m / (sqrt(v) / bc2_sqrt + eps)) * step_size   (step_size = lr / (1 - beta1^step))
then m, v are requantized with new absmax = max |.| per block. The parameter sees the fp32
m and v of this step (as bitsandbytes does); scalars are fp64 on the host, rounded to fp32 once
(`hyper_params`). No fused multiply-add anywhere: the Triton kernel is compiled without fp
fusion. sqrt is the correctly rounded one (the CPU path takes it in fp64: torch's is not).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "BLOCK_SIZE",
    "MIN_8BIT_SIZE",
    "STATE_NAMES",
    "dynamic_map",
    "midpoints",
    "zero_code",
    "num_blocks",
    "uses_8bit",
    "state_bytes",
    "init_state8",
    "quantize_blockwise",
    "dequantize_blockwise",
    "hyper_params",
    "adamw8bit_step_",
]

BLOCK_SIZE = 256
MIN_8BIT_SIZE = 4096
#: State tensors of one 8-bit piece: codes (uint8, one per element), absmax (fp32, per block).
STATE_NAMES = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")
# Elements per pass of the CPU step: large enough that per-op overhead is small, small enough
# that the scratch buffers stay in the last-level cache between the ops of one pass.
_CHUNK = 1 << 17
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


def _check_block_size(block_size: int) -> None:
    # Power of two: the kernel tiles a block with tl.arange.
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")


def init_state8(n: int, block_size: int = BLOCK_SIZE,
                device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Zero states for a piece of n elements: codes of 0.0 and zero absmax (STATE_NAMES)."""
    _check_block_size(block_size)
    nb = num_blocks(n, block_size)
    return {
        "exp_avg_codes": torch.full((n,), zero_code(True), dtype=torch.uint8, device=device),
        "exp_avg_absmax": torch.zeros(nb, dtype=torch.float32, device=device),
        "exp_avg_sq_codes": torch.full((n,), zero_code(False), dtype=torch.uint8, device=device),
        "exp_avg_sq_absmax": torch.zeros(nb, dtype=torch.float32, device=device),
    }


# --------------------------------------------------------------------------------------------
# quantize / dequantize (CPU torch ops, any device)


def _scratch(device: torch.device, name: str, numel: int, dtype: torch.dtype) -> Tensor:
    bufs = _SCRATCH.setdefault(device, {})
    buf = bufs.get(name)
    if buf is None or buf.numel() < numel or buf.dtype != dtype:
        buf = torch.empty(numel, dtype=dtype, device=device)
        bufs[name] = buf
    return buf[:numel]


def _requantize(s: Tensor, k: int, block_size: int, signed: bool, codes: Tensor,
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


def _dequantize_into(out: Tensor, k: int, block_size: int, signed: bool, codes: Tensor,
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
    _check_block_size(block_size)
    n = x.numel()
    nb = num_blocks(n, block_size)
    padded = torch.zeros(nb * block_size, dtype=torch.float32, device=x.device)
    padded[:n] = x.reshape(-1)
    codes = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nb, dtype=torch.float32, device=x.device)
    _requantize(padded, n, block_size, signed, codes, absmax, torch.empty_like(padded),
                torch.empty(n, dtype=torch.int32, device=x.device),
                torch.empty(n, dtype=torch.bool, device=x.device))
    return codes, absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, signed: bool,
                         block_size: int = BLOCK_SIZE) -> Tensor:
    """fp32 values map[codes] * absmax of a flat piece."""
    _check_block_size(block_size)
    n = codes.numel()
    out = torch.empty(absmax.numel() * block_size, dtype=torch.float32, device=codes.device)
    _dequantize_into(out, n, block_size, signed, codes.reshape(-1), absmax,
                     torch.empty(n, dtype=torch.int32, device=codes.device))
    return out[:n]


# --------------------------------------------------------------------------------------------
# the fused step


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
    _check_block_size(block_size)
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
                         hyper=hyper.to(dev), tables=kernel_tables(dev), block_size=block_size,
                         grad_scale=scale_t, found_inf=found_inf, model_copy=model_copy)
        return
    if found_inf is not None and float(found_inf) != 0.0:
        return
    scale = None if scale_t is None else float(scale_t)
    _torch_step(param, grad, m_codes, m_absmax, v_codes, v_absmax, hyper.tolist(), block_size,
                scale, model_copy)


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
    m_buf = _scratch(dev, "m", width, torch.float32)
    v_buf = _scratch(dev, "v", width, torch.float32)
    u_buf = _scratch(dev, "u", width, torch.float32)
    g_buf = _scratch(dev, "g", width, torch.float32)
    i_buf = _scratch(dev, "idx", width, torch.int32)
    f_buf = _scratch(dev, "flag", width, torch.bool)
    d_buf = _scratch(dev, "sqrt", width, torch.float64)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        k, b0 = e - s, s // bs
        nbc = num_blocks(k, bs)
        m, v, u = m_buf[:nbc * bs], v_buf[:nbc * bs], u_buf[:nbc * bs]
        idx, flag = i_buf[:k], f_buf[:k]
        mcs, mas, vcs, vas = mc[s:e], ma[b0:b0 + nbc], vc[s:e], va[b0:b0 + nbc]
        _dequantize_into(m, k, bs, True, mcs, mas, idx)
        _dequantize_into(v, k, bs, False, vcs, vas, idx)
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
        # torch's vectorised fp32 sqrt is off by 1 ulp on ~20% of inputs; the fp64 sqrt rounded
        # to fp32 is the correctly rounded fp32 sqrt (as sqrt.rn on a GPU).
        dk = d_buf[:k].copy_(vk)
        torch.sqrt(dk, out=dk)
        uk.copy_(dk)
        uk.div_(bc2_sqrt)
        uk.add_(eps)
        torch.div(mk, uk, out=uk)
        uk.mul_(step_size)
        pc.sub_(uk)
        if model_copy is not None:
            model_copy[s:e].copy_(pc)
        _requantize(m, k, bs, True, mcs, mas, u, idx, flag)
        _requantize(v, k, bs, False, vcs, vas, u, idx, flag)

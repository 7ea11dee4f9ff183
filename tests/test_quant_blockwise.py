"""Blockwise int8/int4 quantization kernels (zeroshard_kernels.quant_blockwise).

Both backends (the Triton kernels under the interpreter, conftest.py sets TRITON_INTERPRET=1,
and the chunked torch path) are checked bit for bit against the plain whole-tensor torch
reference below, and the kernels are compiled for sm_80/sm_90 with their PTX read for 128/64-bit
global accesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")
from zeroshard_kernels import INTERPRET  # noqa: E402
from zeroshard_kernels import quant_blockwise as QB  # noqa: E402

QMAX = {8: 127, 4: 7}
BACKENDS = ["triton", "torch"]
# the interpreter runs on numpy, which warns about the inf/nan arithmetic these tests feed it
NUMPY_NAN_WARNINGS = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# ---------------------------------------------------------------------------------------------
# reference: whole tensor, no chunking, the format's definition read literally


def ref_quantize(x: torch.Tensor, bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, qmax = x.numel(), QMAX[bits]
    nb = -(-n // block)
    xb = torch.zeros(nb * block)
    xb[:n] = x.float()
    xb = xb.view(nb, block)
    scales = xb.abs().amax(dim=1) / qmax
    q = torch.where(scales[:, None] > 0, xb / scales[:, None], torch.zeros(()))
    q = torch.nan_to_num(q, nan=0.0, posinf=0.0, neginf=0.0).round().clamp(-qmax, qmax)
    q = q.view(-1)[:n].to(torch.int64)
    if bits == 8:
        return q.to(torch.int8), scales
    q = torch.cat([q, q.new_zeros(n % 2)]).view(-1, 2) % 16  # two's complement nibbles
    return (q[:, 0] + 16 * q[:, 1]).to(torch.uint8), scales


def ref_values(codes: torch.Tensor, scales: torch.Tensor, bits: int, block: int,
               n: int) -> torch.Tensor:
    """fp32 codes * scale per element."""
    if bits == 8:
        q = codes.view(torch.int8).to(torch.int64)
    else:
        b = codes.view(torch.uint8).to(torch.int64)
        q = torch.stack([b % 16, b // 16], dim=1).view(-1)
        q = torch.where(q >= 8, q - 16, q)
    return q[:n].float() * scales.repeat_interleave(block)[:n]


def sizes(block: int) -> list[int]:
    return sorted({1, block - 1, block, block + 1, 1000, 100_000} - {0})


CASES = [(bits, block, n) for bits in (8, 4) for block in (64, 256, 2048) for n in sizes(block)]


def test_interpreter_is_on() -> None:
    assert INTERPRET, "conftest.py must set TRITON_INTERPRET=1 before triton is imported"


# ---------------------------------------------------------------------------------------------
# quantize / dequantize


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bits,block,n", CASES)
def test_quantize_bit_exact_and_within_half_a_step(bits: int, block: int, n: int,
                                                   dtype: torch.dtype) -> None:
    torch.manual_seed(n + block + bits)
    # blocks of very different magnitudes, so a per-tensor scale would not pass the bound
    x = (torch.randn(n) * torch.logspace(-3, 3, n)).to(dtype)
    want_c, want_s = ref_quantize(x, bits, block)
    assert want_c.numel() == (n if bits == 8 else (n + 1) // 2)
    assert want_s.numel() == -(-n // block)
    for backend in BACKENDS:
        codes, scales = QB.quantize(x, bits, block, backend=backend)
        assert codes.dtype == (torch.int8 if bits == 8 else torch.uint8)
        assert torch.equal(codes, want_c), backend
        assert torch.equal(scales, want_s), backend
    out = torch.empty(n)
    QB.dequantize(want_c, want_s, bits, block, out, backend="triton")
    assert torch.equal(out, ref_values(want_c, want_s, bits, block, n))
    # |x - deq| <= scale / 2, up to the fp32 roundings of x / scale and codes * scale
    err = (x.float() - out).abs()
    bound = want_s.repeat_interleave(block)[:n] * (0.5 + 2**-20) + x.float().abs() * 2**-23
    assert bool((err <= bound).all()), float((err - bound).max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_dequantize_into_each_dtype_and_accumulate(backend: str, bits: int,
                                                   dtype: torch.dtype) -> None:
    n, block = 20_001, 256
    torch.manual_seed(bits)
    codes, scales = ref_quantize(torch.randn(n), bits, block)
    vals = ref_values(codes, scales, bits, block, n)
    out = torch.full((n,), 7.0, dtype=dtype)
    QB.dequantize(codes, scales, bits, block, out, backend=backend)
    assert torch.equal(out, vals.to(dtype))  # rounded once, to nearest even
    prev = torch.randn(n).to(dtype)
    out = prev.clone()
    QB.dequantize(codes, scales, bits, block, out, accumulate=True, backend=backend)
    assert torch.equal(out, (prev.float() + vals).to(dtype))  # summed in fp32, rounded once


@pytest.mark.parametrize("bits,block", [(8, 99), (8, 100), (4, 6), (4, 1000)])
def test_blocks_that_are_not_powers_of_two(bits: int, block: int) -> None:
    """The kernels pad such a block to a power of two (masked lanes); every tile is masked."""
    n = 3 * block + 7
    torch.manual_seed(block)
    x = torch.randn(n) * torch.logspace(-2, 2, n)
    want = ref_quantize(x, bits, block)
    for backend in BACKENDS:
        codes, scales = QB.quantize(x, bits, block, backend=backend)
        assert torch.equal(codes, want[0]) and torch.equal(scales, want[1]), backend
        out = torch.empty(n)
        QB.dequantize(codes, scales, bits, block, out, backend=backend)
        assert torch.equal(out, ref_values(*want, bits, block, n)), backend


@pytest.mark.parametrize("bits,block", [(8, 64), (4, 2048), (4, 100)])
def test_torch_path_across_chunks(monkeypatch: pytest.MonkeyPatch, bits: int,
                                  block: int) -> None:
    """The torch path works in chunks of CHUNK elements (2^18); shrunk here so that many
    chunk seams, a short last chunk and odd sizes are crossed."""
    from zeroshard.comm import quant_torch as _quant_torch

    monkeypatch.setattr(_quant_torch, "CHUNK", 1000)
    n = 50_001
    pairs, C, S = _rows(3, n, bits, block)
    x = torch.randn(n) * torch.logspace(-3, 3, n)
    want = ref_quantize(x, bits, block)
    codes, scales = QB.quantize(x, bits, block, backend="torch")
    assert torch.equal(codes, want[0]) and torch.equal(scales, want[1])
    out = torch.empty(n, dtype=torch.bfloat16)
    QB.dequantize(codes, scales, bits, block, out, backend="torch")
    assert torch.equal(out, ref_values(*want, bits, block, n).to(torch.bfloat16))
    total = ref_sum(pairs, bits, block, n, own=x, own_row=1, divisor=3)
    out = torch.empty(n)
    QB.dequantize_sum(C, S, bits, block, out, own=x, own_row=1, divisor=3, backend="torch")
    assert torch.equal(out, total)
    codes, scales = QB.requantize_sum(C, S, bits, block, n, own=x, own_row=1, divisor=3,
                                      backend="torch")  # fmt: skip
    want = ref_quantize(total, bits, block)
    assert torch.equal(codes, want[0]) and torch.equal(scales, want[1])


def test_int4_and_int8_layout_hand_computed() -> None:
    # block 8, absmax 7: scale 1.0 exactly; 3.5 and 2.5 are ties (to even: 4 and 2)
    x = torch.tensor([7.0, -7.0, 1.0, -2.0, 3.5, 0.0, -1.0])
    for backend in BACKENDS:
        codes, scales = QB.quantize(x, 4, 8, backend=backend)
        # nibbles 7, -7=0x9 | 1, -2=0xE | 4, 0 | -1=0xF, pad 0: low nibble = even element
        assert codes.tolist() == [0x97, 0xE1, 0x04, 0x0F], backend
        assert scales.tolist() == [1.0]
        codes, scales = QB.quantize(torch.tensor([127.0, 2.5, -2.5, 0.5, -1.5]), 8, 4,
                                    backend=backend)  # fmt: skip
        # -1.5 alone in the second block: its own absmax, so code -127
        assert codes.tolist() == [127, 2, -2, 0, -127]
        assert scales.tolist() == [1.0, float(torch.tensor(1.5) / 127)]
    out = torch.empty(7)
    QB.dequantize(torch.tensor([0x97, 0xE1, 0x04, 0x0F], dtype=torch.uint8),
                  torch.tensor([0.5]), 4, 8, out, backend="triton")
    assert out.tolist() == [3.5, -3.5, 0.5, -1.0, 2.0, 0.0, -0.5]


@NUMPY_NAN_WARNINGS
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [8, 4])
def test_zero_blocks_and_non_finite_blocks(backend: str, bits: int) -> None:
    block, n = 64, 64 * 5 + 3
    x = torch.randn(n)
    x[0:64] = 0.0  # block 0: zeros
    x[64 + 5] = float("inf")  # block 1: +inf
    x[128 + 9] = float("-inf")  # block 2: -inf and nan
    x[128 + 10] = float("nan")
    x[256:] = 0.0
    x[256 + 1] = 1e-45  # block 4: absmax / qmax underflows to 0 (the rest of it is zero)
    codes, scales = QB.quantize(x, bits, block, backend=backend)
    want_c, want_s = ref_quantize(x, bits, block)
    assert torch.equal(codes, want_c)
    assert scales[0] == 0 and scales[1] == float("inf") and scales[2].isnan()
    assert torch.isfinite(scales[3]) and scales[4] == 0
    out = torch.empty(n)
    QB.dequantize(codes, scales, bits, block, out, backend=backend)
    assert bool((out[0:64] == 0).all()) and not bool(out[0:64].signbit().any())
    assert bool(out[64:192].isnan().all())  # the whole block, not just the bad element
    assert bool(out[192:].isfinite().all()) and bool((out[256:] == 0).all())
    acc = torch.zeros(n, dtype=torch.bfloat16)
    QB.dequantize(codes, scales, bits, block, acc, accumulate=True, backend=backend)
    assert bool(acc[64:192].isnan().all()) and bool(acc[192:].isfinite().all())


# ---------------------------------------------------------------------------------------------
# dequantize_sum / requantize_sum


def _rows(k: int, n: int, bits: int, block: int) -> tuple[list, torch.Tensor, torch.Tensor]:
    torch.manual_seed(k * n + bits)
    xs = [torch.randn(n) * 10.0 ** (r - 2) for r in range(k)]  # magnitudes: order matters
    pairs = [ref_quantize(x, bits, block) for x in xs]
    return pairs, torch.stack([c for c, _ in pairs]), torch.stack([s for _, s in pairs])


def ref_sum(pairs, bits, block, n, own=None, own_row=-1, divisor=None) -> torch.Tensor:
    acc = torch.zeros(n)
    for r, (c, s) in enumerate(pairs):
        acc += own.float() if r == own_row else ref_values(c, s, bits, block, n)
    return acc / divisor if divisor else acc


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [8, 4])
def test_dequantize_sum_in_row_order(backend: str, bits: int) -> None:
    n, block, k = 40_001, 128, 5
    pairs, C, S = _rows(k, n, bits, block)
    want = ref_sum(pairs, bits, block, n)
    out = torch.empty(n)
    QB.dequantize_sum(C, S, bits, block, out, backend=backend)
    assert torch.equal(out, want)
    # another order rounds differently somewhere: the row order is really the one used
    rev = torch.empty(n)
    QB.dequantize_sum(C.flip(0).contiguous(), S.flip(0).contiguous(), bits, block, rev,
                      backend=backend)  # fmt: skip
    assert not torch.equal(rev, out)
    # the same bits from a list of rows, and from rows spaced inside one wire-like buffer
    again = torch.empty(n)
    QB.dequantize_sum(list(C), list(S), bits, block, again, backend=backend)
    assert torch.equal(again, out)
    cb, sb = C.shape[1] + 16 - C.shape[1] % 16, 4 * S.shape[1]
    wire = torch.zeros(k, cb + sb + 16, dtype=torch.uint8)  # [codes | pad | scales | pad]
    wire[:, : C.shape[1]] = C.view(torch.uint8)
    wire[:, cb : cb + sb] = S.view(torch.uint8)
    codes = [w[: C.shape[1]] for w in wire]
    scales = [w[cb : cb + sb].view(torch.float32) for w in wire]
    QB.dequantize_sum(codes, scales, bits, block, again, backend=backend)
    assert torch.equal(again, out)
    bf = torch.empty(n, dtype=torch.bfloat16)
    QB.dequantize_sum(C, S, bits, block, bf, backend=backend)
    assert torch.equal(bf, want.to(torch.bfloat16))


@NUMPY_NAN_WARNINGS
@pytest.mark.parametrize("backend", BACKENDS)
def test_dequantize_sum_own_row_divisor_accumulate_and_nan(backend: str) -> None:
    n, block, k, bits = 3000, 64, 4, 4
    pairs, C, S = _rows(k, n, bits, block)
    own = torch.randn(n).to(torch.bfloat16)
    C[2] = 0x77  # row 2's codes and scales are not read: own stands in for them
    S[2] = float("nan")
    want = ref_sum(pairs, bits, block, n, own=own, own_row=2, divisor=4)
    prev = torch.randn(n)
    out = prev.clone()
    QB.dequantize_sum(C, S, bits, block, out, accumulate=True, own=own, own_row=2, divisor=4,
                      backend=backend)  # fmt: skip
    assert torch.equal(out, prev + want)
    x1 = torch.randn(n)
    x1[3 * block + 5] = float("inf")  # an overflow in one rank's block reaches the sum
    C[1], S[1] = ref_quantize(x1, bits, block)
    QB.dequantize_sum(C, S, bits, block, out, own=own, own_row=2, backend=backend)
    assert bool(out[3 * block : 4 * block].isnan().all())
    assert int(out.isnan().sum()) == block


@NUMPY_NAN_WARNINGS
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits,out_bits", [(8, 8), (4, 4), (4, 8)])
def test_requantize_sum_is_quantize_of_the_sum(backend: str, bits: int, out_bits: int) -> None:
    n, block, k = 20_003, 256, 3
    pairs, C, S = _rows(k, n, bits, block)
    own = torch.randn(n)
    want = ref_quantize(ref_sum(pairs, bits, block, n, own=own, own_row=0, divisor=3),
                        out_bits, block)  # fmt: skip
    codes, scales = QB.requantize_sum(C, S, bits, block, n, out_bits=out_bits, own=own,
                                      own_row=0, divisor=3, backend=backend)  # fmt: skip
    assert torch.equal(codes, want[0]) and torch.equal(scales, want[1])
    S[1, 0] = float("nan")
    codes, scales = QB.requantize_sum(C, S, bits, block, n, backend=backend)
    assert scales[0].isnan() and bool(scales[1:].isfinite().all())


def test_bad_operands_are_named() -> None:
    x = torch.zeros(10)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        QB.quantize(x, 3, 64)
    with pytest.raises(ValueError, match="even for int4"):
        QB.quantize(x, 4, 63)
    with pytest.raises(ValueError, match="x must be one of"):
        QB.quantize(x.double(), 8, 64)
    with pytest.raises(ValueError, match="scales must be contiguous with 1 elements"):
        QB.dequantize(torch.zeros(10, dtype=torch.int8), torch.zeros(2), 8, 64, x)
    with pytest.raises(ValueError, match="codes must be contiguous with 5 elements"):
        QB.dequantize(torch.zeros(10, dtype=torch.uint8), torch.zeros(1), 4, 64, x)
    with pytest.raises(ValueError, match="own_row must be in"):
        QB.dequantize_sum(torch.zeros(2, 10, dtype=torch.int8), torch.zeros(2, 1), 8, 64, x,
                          own=x, own_row=2)  # fmt: skip
    with pytest.raises(ValueError, match="2 rows of codes but 3 rows of scales"):
        QB.dequantize_sum(torch.zeros(2, 10, dtype=torch.int8), torch.zeros(3, 1), 8, 64, x)
    with pytest.raises(ValueError, match="unknown backend"):
        QB.quantize(x, 8, 64, backend="cuda")


# ---------------------------------------------------------------------------------------------
# GPU code generation (no GPU needed): the unmasked path's global accesses are vectors.

_COMPILE = textwrap.dedent("""
    import json, re, sys
    import triton
    import zeroshard_kernels.quant_blockwise as Q
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    variants, archs = json.loads(sys.argv[1])
    out = {}
    for name, (kname, types, cx) in variants.items():
        kernel = getattr(Q, kname)
        sig = {p.name: "constexpr" if p.is_constexpr else types.get(p.name, "i32")
               for p in kernel.params}
        # torch's 16-byte-aligned pointers and row strides (Triton specialises on this)
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(sig)
                 if sig[a].startswith("*") or a.endswith("_stride")}
        for arch in archs:
            src = ASTSource(fn=kernel, signature=sig, constexprs=dict(cx, BLOCK=4096),
                            attrs=attrs)
            ptx = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                 options={"num_warps": 8, "enable_fp_fusion": False}).asm["ptx"]
            ops = {}
            for m in re.findall(r"\\b((?:ld|st)\\.global[.\\w]*)", ptx):
                ops[m] = ops.get(m, 0) + 1
            ops["fma"] = len(re.findall(r"\\bfma\\.", ptx))
            ops["div.rn"] = ptx.count("div.rn.f32")
            ops["magic"] = ptx.count("0f4B400000")
            out[f"{name}@{arch}"] = ops
    print(json.dumps(out))
""")
_SUM = {"codes_ptr": "*u8", "scales_ptr": "*fp32", "own_ptr": "*fp32", "out_ptr": "*fp32",
        "out_codes_ptr": "*u8", "out_scales_ptr": "*fp32", "n": "i64"}
_SUMX = {"BITS": 4, "QB": 128, "QBP": 128, "HAS_OWN": True, "HAS_DIV": True,
         "ACCUMULATE": False}
# name: (kernel, pointer types, constexprs, {access: count expected in the unmasked path});
# BLOCK 4096 on 8 warps = 16 elements per thread: 64 B of fp32, 32 B of bf16, 16 B of int8
# codes (one v4), 8 B of int4 codes (one v2, the widest 8 bytes allow).
VARIANTS = {
    "quantize-fp32-int8": ("quantize_kernel",
                           {"x_ptr": "*fp32", "codes_ptr": "*i8", "scales_ptr": "*fp32"},
                           {"BITS": 8, "QMAXF": 127.0, "QB": 256, "QBP": 256},
                           {"ld.global.v4.b32": 4, "st.global.v4.b32": 1}),
    "quantize-bf16-int4": ("quantize_kernel",
                           {"x_ptr": "*bf16", "codes_ptr": "*u8", "scales_ptr": "*fp32"},
                           {"BITS": 4, "QMAXF": 7.0, "QB": 64, "QBP": 64},
                           {"ld.global.v4.b32": 2, "st.global.v2.b32": 1}),
    "dequantize-int8-fp32-acc": ("dequantize_kernel",
                                 {"codes_ptr": "*i8", "scales_ptr": "*fp32", "out_ptr": "*fp32"},
                                 {"BITS": 8, "QB": 2048, "QBP": 2048, "ACCUMULATE": True},
                                 {"ld.global.v4.b32": 5, "st.global.v4.b32": 4}),
    "dequantize-int4-bf16": ("dequantize_kernel",
                             {"codes_ptr": "*u8", "scales_ptr": "*fp32", "out_ptr": "*bf16"},
                             {"BITS": 4, "QB": 256, "QBP": 256, "ACCUMULATE": False},
                             {"ld.global.v2.b32": 1, "st.global.v4.b32": 2}),
    "dequantize-sum-int4": ("dequantize_sum_kernel", _SUM, dict(_SUMX, OUT_BITS=0,
                            OUT_QMAXF=0.0), {"ld.global.v2.b32": 1, "ld.global.v4.b32": 4,
                                             "st.global.v4.b32": 4}),
    "requantize-sum-int4": ("dequantize_sum_kernel", _SUM, dict(_SUMX, OUT_BITS=4,
                            OUT_QMAXF=7.0), {"ld.global.v2.b32": 1, "ld.global.v4.b32": 4,
                                             "st.global.v2.b32": 1}),
}
ARCHS = [80, 90]


@pytest.fixture(scope="module")
def ptx_ops() -> dict[str, dict[str, int]]:
    # The interpreter replaces @triton.jit functions: compile in an interpreter-off process.
    spec = {k: v[:3] for k, v in VARIANTS.items()}
    proc = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps([spec, ARCHS])],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TRITON_INTERPRET="0"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compiles_for_gpu_with_vector_accesses(ptx_ops: dict, variant: str, arch: int) -> None:
    got = ptx_ops[f"{variant}@{arch}"]
    for access, count in VARIANTS[variant][3].items():
        assert got.get(access, 0) >= count, (access, got)
    assert got["fma"] == 0, got  # no contraction: products round as in torch
    # IEEE divisions (Triton's `/` is approximate on GPU), and the round-half-even constant
    # survives compilation (a folded (q + C) - C would truncate nothing and round nothing)
    encodes = variant.startswith(("quantize", "requantize"))
    assert (got["div.rn"] > 0) == (encodes or "sum" in variant), got
    assert (got["magic"] > 0) == encodes, got

"""Triton update kernels: arithmetic under the interpreter, code generation by compiling for GPUs.

The interpreter (TRITON_INTERPRET=1, set in conftest.py) runs the kernels on CPU tensors against
the same torch.optim / float64 references as tests/test_update.py. It cannot see GPU-only
failures (types, constexpr misuse, scalar memory traffic), so every kernel is also compiled for
sm_80 and sm_90 in a subprocess with the interpreter off and its PTX is checked for 128-bit
global loads/stores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests import test_update as tu
from tests.update_cases import CASES, GDTYPES, LRS, assert_matches, make_grads, reference, run_ours
from zeroshard.update.apply import apply_update, init_state

triton = pytest.importorskip("triton")
K = pytest.importorskip("zeroshard_kernels")

BLOCK = K.INTERPRET_BLOCK
SIZES = [0, 1, BLOCK - 1, BLOCK + 1, 100003]


def test_interpreter_is_on() -> None:
    assert K.INTERPRET, "conftest.py must set TRITON_INTERPRET=1 before triton is imported"


@pytest.mark.parametrize("gdtype", GDTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference(case: str, n: int, gdtype: torch.dtype) -> None:
    """Three steps (bias correction, first-step momentum, lr schedule), grad scale, bf16 copy."""
    rule, hp = CASES[case]
    torch.manual_seed(n + 7)
    loss_scale = 2.0 if gdtype == torch.float32 else 512.0
    p0 = torch.randn(n)
    grads = make_grads(n, len(LRS), gdtype, loss_scale)
    p, state, copy = run_ours(rule, hp, p0, grads, 1.0 / loss_scale, "triton", torch.bfloat16)
    ref_p, ref_state = reference(rule, hp, p0, grads, 1.0 / loss_scale)
    if n:
        assert not torch.equal(p, p0)
    assert_matches(rule, hp, p, state, ref_p, ref_state)
    assert copy is not None
    # Round to nearest even, bit-exact with torch's conversion.
    assert torch.equal(copy.view(torch.int16), p.to(torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("case", ["adamw", "sgd-nesterov-max", "lion"])
def test_fp16_copy_and_tensor_scale(case: str) -> None:
    rule, hp = CASES[case]
    torch.manual_seed(11)
    n = BLOCK + 3
    p0, g = torch.randn(n), torch.randn(n).to(torch.float16)
    ref_p, ref_state = reference(rule, hp, p0, [g], 0.25)
    p = p0.clone()
    state = init_state(rule, hp, [p])
    copy = torch.empty(n, dtype=torch.float16)
    apply_update(rule, [p], [g], state, lr=LRS[0], step=1, hp=hp, model_copies=[copy],
                 grad_scale=torch.tensor(0.25), backend="triton")
    assert_matches(rule, hp, p, {k: v for k, v in state.items()}, ref_p, ref_state)
    assert torch.equal(copy.view(torch.int16), p.to(torch.float16).view(torch.int16))


def test_bf16_rounding_edge_cases() -> None:
    """Ties to even, inf, nan and overflow to inf in the bf16 copy, via a 0-lr Lion step
    (p * 1 - 0 * sign(0): every value, inf included, passes through unchanged)."""
    vals = [1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 1.0 + 2**-8 + 2**-20, 3.3895e38,
            float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1e-40]
    p = torch.tensor(vals, dtype=torch.float32)
    copy = torch.empty(len(vals), dtype=torch.bfloat16)
    state = init_state("lion", CASES["lion"][1], [p])
    apply_update("lion", [p], [torch.zeros_like(p)], state, lr=0.0, step=1,
                 hp=CASES["lion"][1], model_copies=[copy], backend="triton")
    want = p.to(torch.bfloat16)
    assert torch.equal(copy[:-4].view(torch.int16), want[:-4].view(torch.int16))
    assert copy[7].isnan()
    assert torch.equal(copy[8:].view(torch.int16), want[8:].view(torch.int16))


@pytest.mark.parametrize("case", list(CASES))
def test_found_inf_skips_bit_for_bit_triton(case: str) -> None:
    tu.test_found_inf_skips_bit_for_bit(case, backend="triton")


@pytest.mark.parametrize("gdtype", GDTYPES, ids=lambda d: str(d).split(".")[-1])
def test_grad_stats_kernel(gdtype: torch.dtype) -> None:
    tu.test_grad_stats_matches_float64(gdtype, backend="triton")


def test_wrappers_reject_bad_operands() -> None:
    lr, step = torch.tensor(1e-3), torch.tensor(1.0)
    p = torch.zeros(8)
    with pytest.raises(ValueError, match="exp_avg"):
        K.adam_update(p, p.clone(), torch.zeros(7), torch.zeros(8), None, lr=lr, step=step,
                      beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True)
    with pytest.raises(ValueError, match="grad"):
        K.lion_update(p, torch.zeros(8, dtype=torch.float64), torch.zeros(8), lr=lr, beta1=0.9,
                      beta2=0.99, weight_decay=0.0)
    with pytest.raises(ValueError, match="model_copy"):
        K.sgd_update(p, p.clone(), None, lr=lr, step=step, momentum=0.0, dampening=0.0,
                     nesterov=False, weight_decay=0.0, model_copy=torch.zeros(8))
    with pytest.raises(ValueError, match="momentum_buffer"):
        K.sgd_update(p, p.clone(), None, lr=lr, step=step, momentum=0.9, dampening=0.0,
                     nesterov=False, weight_decay=0.0)


# ---------------------------------------------------------------------------------------------
# GPU code generation (no GPU needed): sm_80 / sm_90 PTX must use 128-bit global accesses.

# (kernel, grad dtype, copy dtype, constexprs, fp32 streams read, fp32 streams written)
VARIANTS: dict[str, tuple[str, str, str, dict, int, int]] = {
    "adamw-fp32": ("adam_kernel", "fp32", "bf16", {"DECOUPLED": True, "AMSGRAD": False,
                   "MAXIMIZE": False, "HAS_SCALE": False, "HAS_INF": False,
                   "HAS_COPY": False}, 4, 3),
    "adam-amsgrad-bf16-all": ("adam_kernel", "bf16", "bf16", {"DECOUPLED": False,
                              "AMSGRAD": True, "MAXIMIZE": True, "HAS_SCALE": True,
                              "HAS_INF": True, "HAS_COPY": True}, 4, 4),
    "adamw-fp16-copy": ("adam_kernel", "fp16", "fp16", {"DECOUPLED": True, "AMSGRAD": False,
                        "MAXIMIZE": False, "HAS_SCALE": True, "HAS_INF": True,
                        "HAS_COPY": True}, 3, 3),
    "sgd-nesterov": ("sgd_kernel", "fp32", "bf16", {"MOMENTUM": True, "NESTEROV": True,
                     "MAXIMIZE": False, "HAS_SCALE": True, "HAS_INF": True,
                     "HAS_COPY": True}, 3, 2),
    "sgd-plain-bf16": ("sgd_kernel", "bf16", "bf16", {"MOMENTUM": False, "NESTEROV": False,
                       "MAXIMIZE": True, "HAS_SCALE": False, "HAS_INF": False,
                       "HAS_COPY": True}, 1, 1),
    "lion": ("lion_kernel", "fp32", "bf16", {"HAS_SCALE": True, "HAS_INF": True,
             "HAS_COPY": True}, 3, 2),
    "grad-stats-fp32": ("grad_stats_kernel", "fp32", "bf16", {}, 1, 0),
    "grad-stats-bf16": ("grad_stats_kernel", "bf16", "bf16", {}, 0, 0),
}
# (arch, BLOCK, num_warps): both ends of the autotune space.
TARGETS = [(80, 1024, 4), (90, 4096, 8)]

_COMPILE_SCRIPT = textwrap.dedent("""
    import json, re, sys
    import triton
    import zeroshard_kernels as K
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    variants, targets = json.loads(sys.argv[1])
    out = {}
    for name, (kname, gdt, cdt, cx, _, _) in variants.items():
        kernel = getattr(K, kname)
        sig, consts = {}, dict(cx)
        for prm in kernel.params:
            a = prm.name
            if prm.is_constexpr:
                sig[a] = "constexpr"
            elif a == "g_ptr":
                sig[a] = "*" + gdt
            elif a == "copy_ptr":
                sig[a] = "*" + cdt
            elif a.endswith("_ptr"):
                sig[a] = "*fp32"
            else:
                sig[a] = "i64" if a == "n" else "fp32"
        ptrs = [i for i, a in enumerate(sig) if sig[a].startswith("*")]
        # 16-byte aligned pointers, as torch allocates them (Triton specialises on this).
        attrs = {(i,): [["tt.divisibility", 16]] for i in ptrs}
        for arch, block, warps in targets:
            consts.update({"BLOCK": block} | ({"SIZE_CLASS": 1} if "SIZE_CLASS" in sig else {}))
            src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
            ptx = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                 options={"num_warps": warps}).asm["ptx"]
            out[f"{name}@{arch}"] = {
                "ld_v4": len(re.findall(r"ld\\.global[.\\w]*\\.v4", ptx)),
                "st_v4": len(re.findall(r"st\\.global[.\\w]*\\.v4", ptx)),
                "st_any": len(re.findall(r"st\\.global", ptx)),
            }
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def ptx_stats() -> dict[str, dict[str, int]]:
    # The interpreter replaces @triton.jit functions, so compile in a fresh interpreter-off process.
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, json.dumps([VARIANTS, TARGETS])],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"sm{t[0]}")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compiles_for_gpu_with_vector_accesses(
    ptx_stats: dict[str, dict[str, int]], variant: str, target: tuple[int, int, int]
) -> None:
    arch, block, warps = target
    _, _, _, _, reads, writes = VARIANTS[variant]
    got = ptx_stats[f"{variant}@{arch}"]
    # Each thread owns block / (32 * warps) contiguous elements: every fp32 stream must move
    # them all in 128-bit (4-element) accesses, in the unmasked full-block path at least.
    v4_per_stream = block // (32 * warps) // 4
    assert got["ld_v4"] >= max(1, reads * v4_per_stream), got
    assert got["st_v4"] >= writes * v4_per_stream, got
    assert got["st_any"] > 0, got

"""Blockwise 8-bit AdamW states: the maps, the quantizer, the fused step on both backends.

The CPU path and the Triton kernel (interpreter, TRITON_INTERPRET=1 from conftest.py) must give
identical bits; training with 8-bit states must track fp32 AdamW; the kernel must compile for
sm_80 / sm_90 with vectorised accesses and without fused multiply-adds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from zeroshard import quant8 as Q
from zeroshard.demo.tiny_gpt import BigramLanguage, GPTConfig, TinyGPT

K = pytest.importorskip("zeroshard_kernels")


# ---------------------------------------------------------------------------------------------
# maps and quantizer


def test_maps_are_bitsandbytes_dynamic_maps() -> None:
    # Values and sums of bitsandbytes 0.50.2's create_dynamic_map(signed=True / False), taken
    # once from the library itself (it is not a test dependency).
    s, u = Q.dynamic_map(True), Q.dynamic_map(False)
    want_s = {0: -0.992968738079071, 1: -0.9789062738418579, 126: -5.500000384017767e-07,
              127: 0.0, 128: 5.500000384017767e-07, 200: 0.23359374701976776,
              254: 0.992968738079071, 255: 1.0}
    want_u = {0: 0.0, 1: 3.2500003044333425e-07, 126: 0.09929687529802322, 127: 0.103515625,
              128: 0.11054687201976776, 200: 0.6167968511581421, 254: 0.9964843988418579,
              255: 1.0}
    assert {i: s[i].item() for i in want_s} == want_s
    assert {i: u[i].item() for i in want_u} == want_u
    assert s.double().abs().sum().item() == pytest.approx(75.10526317200026, abs=1e-12)
    assert u.double().sum().item() == pytest.approx(75.1052632433869, abs=1e-12)
    assert (Q.zero_code(True), Q.zero_code(False)) == (127, 0)


@pytest.mark.parametrize("signed", [True, False])
def test_rounding_is_count_of_midpoints_below(signed: bool) -> None:
    """The CPU table lookup equals a plain search over the midpoints, at every bucket edge,
    on and next to every midpoint, and on random values."""
    mid = Q.midpoints(signed)[:255]
    torch.manual_seed(0)
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    x = torch.cat([torch.rand(200_000) * 2 - 1, mid, torch.nextafter(mid, up),
                   torch.nextafter(mid, down), Q.dynamic_map(signed),
                   torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 1e-45])])
    edges = (torch.arange(1 << 16, dtype=torch.int64) << 15).to(torch.int32).view(torch.float32)
    x = torch.cat([x, edges[edges.abs() <= 1]])
    x = x if signed else x.abs()
    x = torch.cat([x, torch.zeros(-x.numel() % 15)]).view(-1, 15)
    # One 1.0 per block of 16: absmax is 1, so the code is that of x itself.
    blocks = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1).flatten()
    codes, absmax = Q.quantize_blockwise(blocks, signed, block_size=16)
    assert torch.all(absmax == 1.0)
    want = torch.bucketize(x.flatten(), mid, right=False)
    assert torch.equal(codes.view(-1, 16)[:, :15].flatten().long(), want)
    # Ties go to the lower code: midpoint k (between map values k and k+1) gives code k.
    ties = torch.cat([mid.view(17, 15), torch.ones(17, 1)], dim=1).flatten()
    c_ties, _ = Q.quantize_blockwise(ties, signed, block_size=16)
    assert torch.equal(c_ties.view(17, 16)[:, :15].flatten().long(), torch.arange(255))


@pytest.mark.parametrize("signed", [True, False])
def test_roundtrip_error_bounds(signed: bool) -> None:
    """Nearest map value: |x/absmax - map[code]| <= half the gap to either neighbour; the worst
    normalised error is the largest half-gap of the map (signed 0.0070, unsigned 0.0035)."""
    torch.manual_seed(1)
    n = 64 * 256 + 77  # short last block
    x = torch.randn(n) if signed else torch.randn(n) ** 2
    x[256:512] = 0.0  # an all-zero block
    codes, absmax = Q.quantize_blockwise(x, signed)
    assert codes.dtype == torch.uint8 and absmax.numel() == Q.num_blocks(n) == 65
    assert absmax[1] == 0 and torch.all(codes[256:512] == Q.zero_code(signed))
    back = Q.dequantize_blockwise(codes, absmax, signed)
    q = Q.dynamic_map(signed)
    scale = absmax.repeat_interleave(256)[:n]
    assert torch.equal(absmax, torch.cat([b.abs().max().reshape(1) for b in x.split(256)]))
    err = ((back - x).abs() / torch.where(scale > 0, scale, 1)).double()
    gap = (q[1:] - q[:-1]).double()
    half_gap = torch.maximum(torch.cat([gap, gap[-1:]]), torch.cat([gap[:1], gap])) / 2
    if signed:  # no -1.0 in the signed map: a block whose extreme is negative rounds to map[0]
        half_gap[0] = 1.0 + q[0].double()
    assert torch.all(err <= half_gap[codes.long()] * (1 + 1e-5))
    assert err.max() <= 0.00704 if signed else err.max() <= 0.00352
    big = (x.abs() >= 0.1 * scale) & (scale > 0)
    rel = (back - x)[big].abs() / x[big].abs()
    # Within the top decade [0.1, 1] the map's step is 0.9/64 (signed) or 0.9/128 (unsigned):
    # relative error at most half a step over 0.1.
    assert rel.max() <= (0.0704 if signed else 0.0352)
    assert rel.mean() < (0.02 if signed else 0.01)
    # Dequantized values are fixed points, in blocks whose extreme is positive (code 255 = 1.0;
    # a negative extreme maps to -0.993 and the requantized block has a smaller absmax).
    c2, a2 = Q.quantize_blockwise(back, signed)
    pos = codes.view(-1)[: 64 * 256].view(64, 256).eq(255).any(dim=1)
    assert int(pos.sum()) > 20
    assert torch.equal(a2[:64][pos], absmax[:64][pos])
    assert torch.equal(c2[: 64 * 256].view(64, 256)[pos], codes[: 64 * 256].view(64, 256)[pos])


def test_sizes_and_fallback_rule() -> None:
    assert Q.num_blocks(10_000) == 40 and Q.num_blocks(256) == 1 and Q.num_blocks(0) == 0
    assert Q.uses_8bit(4096) and not Q.uses_8bit(4095)
    assert Q.state_bytes(10_000) == 2 * 10_000 + 8 * 40
    assert Q.state_bytes(4095) == 8 * 4095
    st = Q.init_state8(10_000)
    assert sum(t.numel() * t.element_size() for t in st.values()) == Q.state_bytes(10_000)
    assert torch.all(Q.dequantize_blockwise(st["exp_avg_codes"], st["exp_avg_absmax"], True) == 0)
    with pytest.raises(ValueError, match="power of two"):
        Q.init_state8(10, block_size=100)
    assert Q.block_slice(512, 300) == slice(2, 4) and Q.block_slice(0, 256) == slice(0, 1)
    with pytest.raises(ValueError, match="not a multiple"):
        Q.block_slice(100, 300)


def test_pieces_step_like_the_whole() -> None:
    """A parameter split into block-aligned pieces (any world size) steps to the same bits as
    the whole: codes and absmax of the pieces are slices of the whole's."""
    n, torch_gen = 5000, torch.Generator().manual_seed(9)
    p0 = torch.randn(n, generator=torch_gen)
    grads = [torch.randn(n, generator=torch_gen) for _ in range(3)]
    whole, st = p0.clone(), Q.init_state8(n)
    for t, g in enumerate(grads, 1):
        Q.adamw8bit_step_(whole, g, *st.values(), lr=1e-2, step=t)
    for cuts in ([0, 2560, n], [0, 256, 1280, 4864, n]):
        for a, b in zip(cuts[:-1], cuts[1:]):
            p, pst = p0[a:b].clone(), Q.init_state8(b - a)
            for t, g in enumerate(grads, 1):
                Q.adamw8bit_step_(p, g[a:b], *pst.values(), lr=1e-2, step=t)
            blocks = Q.block_slice(a, b - a)
            assert torch.equal(p, whole[a:b])
            assert torch.equal(pst["exp_avg_codes"], st["exp_avg_codes"][a:b])
            assert torch.equal(pst["exp_avg_sq_absmax"], st["exp_avg_sq_absmax"][blocks])


# ---------------------------------------------------------------------------------------------
# the step


def _run(n: int, gdtype: torch.dtype, backend: str, steps: int = 3, block: int = 256,
         copy: bool = True, **kw: float) -> tuple[torch.Tensor, dict[str, torch.Tensor],
                                                  torch.Tensor | None]:
    torch.manual_seed(n + block)
    p = torch.randn(n)
    st = Q.init_state8(n, block)
    mc = torch.empty(n, dtype=torch.bfloat16) if copy else None
    for t in range(1, steps + 1):
        g = (torch.randn(n) * 0.5 ** t).to(gdtype)
        Q.adamw8bit_step_(p, g, *st.values(), lr=1e-2, weight_decay=0.1, step=t,
                          block_size=block, model_copy=mc, backend=backend, **kw)
    return p, st, mc


@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("n,block", [(1, 256), (300, 256), (K.INTERPRET_BLOCK + 300, 256),
                                     (2 * K.INTERPRET_BLOCK, 64), (5000, 4096)])
def test_triton_and_cpu_bit_identical(n: int, block: int, gdtype: torch.dtype) -> None:
    kw = {"grad_scale": 0.5} if gdtype == torch.float16 else {}
    a = _run(n, gdtype, "torch", block=block, **kw)
    b = _run(n, gdtype, "triton", block=block, **kw)
    assert torch.equal(a[0], b[0])
    for name in Q.STATE_NAMES:
        assert torch.equal(a[1][name], b[1][name]), name
    assert a[2] is not None and b[2] is not None
    assert torch.equal(a[2].view(torch.int16), b[2].view(torch.int16))
    assert torch.equal(a[2].view(torch.int16), a[0].to(torch.bfloat16).view(torch.int16))
    # The states moved: not a no-op on either side.
    assert a[1]["exp_avg_absmax"].min() > 0 and a[1]["exp_avg_sq_absmax"].min() > 0


def test_first_step_is_adamw() -> None:
    """From zero states the update uses this step's fp32 moments: it is AdamW's first step."""
    torch.manual_seed(3)
    n = 3000
    p0, g = torch.randn(n), torch.randn(n)
    ref = nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    ref.grad = g.clone()
    opt.step()
    for backend in ("torch", "triton"):
        p = p0.clone()
        Q.adamw8bit_step_(p, g, *Q.init_state8(n).values(), lr=1e-2, beta2=0.99,
                          weight_decay=0.1, step=1, backend=backend)
        assert (p - ref.detach()).abs().max() < 2e-7


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_found_inf_skips_and_tensor_scale(backend: str) -> None:
    n = 1000
    p, st, _ = _run(n, torch.float32, backend, steps=1, copy=False)
    before = [p.clone()] + [t.clone() for t in st.values()]
    Q.adamw8bit_step_(p, torch.full((n,), float("nan")), *st.values(), lr=1e-2, step=2,
                      found_inf=torch.tensor(1.0), backend=backend)
    assert all(torch.equal(x, y) for x, y in zip(before, [p, *st.values()]))
    # A 0-d tensor scale gives the same bits as the float.
    a = _run(n, torch.float32, backend, steps=2, copy=False, grad_scale=0.25)
    b = _run(n, torch.float32, backend, steps=2, copy=False, grad_scale=torch.tensor(0.25))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["exp_avg_codes"], b[1]["exp_avg_codes"])


def test_rejects_bad_operands() -> None:
    p, g = torch.zeros(300), torch.zeros(300)
    st = Q.init_state8(300)
    with pytest.raises(ValueError, match="m_absmax"):
        Q.adamw8bit_step_(p, g, st["exp_avg_codes"], torch.zeros(1), st["exp_avg_sq_codes"],
                          st["exp_avg_sq_absmax"], lr=1e-3, step=1)
    with pytest.raises(ValueError, match="grad"):
        Q.adamw8bit_step_(p, g.double(), *st.values(), lr=1e-3, step=1)
    with pytest.raises(ValueError, match="1-based"):
        Q.adamw8bit_step_(p, g, *st.values(), lr=1e-3, step=0)


# ---------------------------------------------------------------------------------------------
# training: 8-bit states track fp32 AdamW


class FlatAdamW8bit:
    """The layout an optimizer shard uses, on one process: parameters of at least
    `min_8bit_size` elements in one flat fp32 buffer, each starting at a multiple of the block
    size (zero padding between them stays zero), with 8-bit states; the rest in a second flat
    buffer with fp32 states and torch's fused AdamW."""

    def __init__(self, params: list[nn.Parameter], lr: float, betas: tuple[float, float],
                 weight_decay: float, backend: str = "torch", block: int = Q.BLOCK_SIZE,
                 min_8bit_size: int = Q.MIN_8BIT_SIZE) -> None:
        self.lr, self.betas, self.wd, self.backend, self.block = lr, betas, weight_decay, \
            backend, block
        self.big = [p for p in params if Q.uses_8bit(p.numel(), min_8bit_size)]
        self.small = [p for p in params if not Q.uses_8bit(p.numel(), min_8bit_size)]
        self.flat8, self.slices8 = self._flatten(self.big, block)
        self.flat32, self.slices32 = self._flatten(self.small, 1)
        self.grad8, self.grad32 = torch.zeros_like(self.flat8), torch.zeros_like(self.flat32)
        self.state8 = Q.init_state8(self.flat8.numel(), block)
        self.m32, self.v32 = torch.zeros_like(self.flat32), torch.zeros_like(self.flat32)
        self.steps32 = torch.zeros(())
        self.t = 0

    @staticmethod
    def _flatten(params: list[nn.Parameter], align: int) -> tuple[torch.Tensor, list[slice]]:
        slices, off = [], 0
        for p in params:
            off = -(-off // align) * align
            slices.append(slice(off, off + p.numel()))
            off += p.numel()
        flat = torch.zeros(off)
        for p, s in zip(params, slices):
            flat[s].copy_(p.detach().flatten())
            p.data = flat[s].view_as(p)
        return flat, slices

    def step(self) -> None:
        for params, slices, grad in ((self.big, self.slices8, self.grad8),
                                     (self.small, self.slices32, self.grad32)):
            for p, s in zip(params, slices):
                grad[s].copy_(p.grad.flatten())
                p.grad = None
        self.t += 1
        Q.adamw8bit_step_(self.flat8, self.grad8, *self.state8.values(), lr=self.lr,
                          beta1=self.betas[0], beta2=self.betas[1], eps=1e-8,
                          weight_decay=self.wd, step=self.t, block_size=self.block,
                          backend=self.backend)
        self.steps32 += 1
        torch._fused_adamw_([self.flat32], [self.grad32], [self.m32], [self.v32], [],
                            [self.steps32], lr=self.lr, beta1=self.betas[0],
                            beta2=self.betas[1], weight_decay=self.wd, eps=1e-8, amsgrad=False,
                            maximize=False)


@pytest.fixture
def one_thread():
    """Small models gain nothing from threads, and lose much on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train(model: nn.Module, batches: list, loss_fn, eight_bit: bool, lr: float) -> list[float]:
    params = list(model.parameters())
    opt = (FlatAdamW8bit(params, lr, (0.9, 0.999), 0.01) if eight_bit
           else torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.01))
    losses = []
    for x, y in batches:
        loss = loss_fn(model, x, y)
        loss.backward()
        opt.step()
        if not eight_bit:
            opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def _compare(make_model, batches: list, loss_fn, lr: float) -> tuple[float, float, dict]:
    torch.manual_seed(0)
    ref_model = make_model()
    q_model = make_model()
    q_model.load_state_dict(ref_model.state_dict())
    ref = _train(ref_model, batches, loss_fn, False, lr)
    q = _train(q_model, batches, loss_fn, True, lr)
    return sum(ref[-30:]) / 30, sum(q[-30:]) / 30, {"first": ref[0], "ref": ref, "q": q}


def test_mlp_regression_tracks_fp32_adamw(one_thread: None) -> None:
    """160 steps; layers of 26000 and 16900 elements (not block multiples) go 8-bit, the
    4000-element layer and the biases stay fp32."""
    torch.manual_seed(5)
    teacher = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 1))
    batches = []
    for _ in range(160):
        x = torch.randn(64, 20)
        with torch.no_grad():
            batches.append((x, teacher(x) + 0.01 * torch.randn(64, 1)))

    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(20, 200), nn.GELU(), nn.Linear(200, 130), nn.GELU(),
                             nn.Linear(130, 130), nn.GELU(), nn.Linear(130, 1))

    def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(m(x), y)

    ref, q, info = _compare(make, batches, loss_fn, lr=2e-3)
    assert ref < 0.2 * info["first"], "the reference run must learn"
    print(f"last-30 mean loss: fp32 {ref:.5f}, 8-bit {q:.5f}, rel {(q - ref) / ref:+.4f}")
    assert abs(q - ref) / ref < 0.02, (q, ref)


def test_tiny_gpt_tracks_fp32_adamw(one_thread: None) -> None:
    """The demo GPT (small config), 150 steps on its bigram language: every matrix is 8-bit
    (the 4096-element ones exactly at the threshold), position embedding and vectors fp32."""

    cfg = GPTConfig(vocab_size=64, n_embd=64, n_layer=2, n_head=4, block_size=32)
    lang = BigramLanguage(cfg.vocab_size, seed=1)
    batches = [lang.batch(16, cfg.block_size, seed=s) for s in range(150)]
    ref, q, info = _compare(lambda: TinyGPT(cfg), batches, lambda m, x, y: m(x, y), lr=3e-3)
    assert ref < 0.8 * info["first"], "the reference run must learn"
    print(f"last-30 mean loss: fp32 {ref:.5f}, 8-bit {q:.5f}, rel {(q - ref) / ref:+.4f}")
    assert abs(q - ref) / ref < 0.02, (q, ref)


# ---------------------------------------------------------------------------------------------
# GPU code generation (no GPU needed)

_COMPILE_SCRIPT = textwrap.dedent("""
    import json, re, sys
    import triton
    import zeroshard_kernels as K
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    out = {}
    for gdt, arch, block, warps, qblock, flags in json.loads(sys.argv[1]):
        sig = {}
        for prm in K.adamw8bit_kernel.params:
            a = prm.name
            if prm.is_constexpr:
                sig[a] = "constexpr"
            elif a == "g_ptr":
                sig[a] = "*" + gdt
            elif a in ("mq_ptr", "vq_ptr"):
                sig[a] = "*u8"
            elif a == "copy_ptr":
                sig[a] = "*bf16"
            elif a.endswith("_ptr"):
                sig[a] = "*fp32"
            else:
                sig[a] = "i64"
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(sig)
                 if sig[a].startswith("*")}
        consts = dict(HAS_SCALE=flags, HAS_INF=flags, HAS_COPY=flags, QBLOCK=qblock,
                      SIZE_CLASS=1, BLOCK=block)
        src = ASTSource(fn=K.adamw8bit_kernel, signature=sig, constexprs=consts, attrs=attrs)
        # As launched on a GPU: no fp fusion, so no contracted multiply-add.
        ptx = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                             options={"num_warps": warps, "enable_fp_fusion": False}).asm["ptx"]
        count = lambda pat: len(re.findall(pat, ptx))
        out[f"{gdt}@{arch}/{qblock}"] = {
            "ld_v4": count(r"ld\\.global[.\\w]*\\.v4"), "ld_v2": count(r"ld\\.global[.\\w]*\\.v2"),
            "st_v4": count(r"st\\.global[.\\w]*\\.v4"), "fma": count(r"\\bfma\\.[.\\w]*f32"),
            "div_rn": count(r"div\\.rn\\.f32"), "sqrt_rn": count(r"sqrt\\.rn\\.f32"),
            "approx": count(r"\\.approx\\."),
        }
    print(json.dumps(out))
""")
# (grad dtype, arch, BLOCK, num_warps, block_size, scale/inf/copy on): both ends of the
# autotune space, and small / large quantization blocks.
_TARGETS = [("fp32", 80, 1024, 4, 256, True), ("bf16", 80, 1024, 4, 256, True),
            ("fp32", 90, 4096, 8, 256, True), ("bf16", 90, 4096, 8, 256, True),
            ("fp16", 80, 1024, 4, 64, False), ("fp32", 90, 4096, 8, 4096, False)]


def test_compiles_for_sm80_sm90_vectorised_without_fma() -> None:
    # The interpreter replaces @triton.jit functions: compile in a fresh interpreter-off process.
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(_TARGETS)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    for gdt, arch, block, warps, qblock, _ in _TARGETS:
        key = f"{gdt}@{arch}/{qblock}"
        s = stats[key]
        per_thread = block // (32 * warps)  # elements of each stream a thread owns
        # Full tiles: p (and fp32 g) in 16-byte loads, p stored in 16-byte stores; the two
        # code streams in 8- or 16-byte accesses.
        fp32_streams = 2 if gdt == "fp32" else 1
        assert s["ld_v4"] + s["ld_v2"] >= fp32_streams * per_thread // 4 + 2, (key, s)
        assert s["st_v4"] >= per_thread // 4, (key, s)
        assert s["fma"] == 0 and s["approx"] == 0, (key, s)
        assert s["div_rn"] > 0 and s["sqrt_rn"] > 0, (key, s)


def test_sqrt_without_numpy_gives_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU path's fp64 sqrt (used where numpy is missing) is numpy's correctly rounded one."""
    import zeroshard.quant8.step as step_mod

    a = _run(5000, torch.float32, "torch", copy=False)
    monkeypatch.setattr(step_mod, "_np", None)
    b = _run(5000, torch.float32, "torch", copy=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["exp_avg_sq_codes"],
                                                   b[1]["exp_avg_sq_codes"])

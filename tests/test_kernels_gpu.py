"""The Triton kernels on a real GPU (what `make gpu-check` runs first).

Skipped without CUDA, and under TRITON_INTERPRET=1 (the default conftest.py sets for the CPU
suite): `bench/gpu_check.py` runs this file with the interpreter off. The references are the
ones tests/test_kernels.py uses on the interpreter: torch.optim on the CPU (float64 by hand for
Lion), a float64 sum of squares, and the 8-bit step's CPU path (identical bits by design).
"""

from __future__ import annotations

import pytest
import torch

from tests.update_cases import CASES, GDTYPES, LRS, assert_matches, make_grads, reference
from zeroshard.update.apply import apply_update, grad_stats, init_state

K = pytest.importorskip("zeroshard_kernels")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or K.INTERPRET,
    reason="needs a CUDA device and TRITON_INTERPRET=0 (make gpu-check)",
)
SIZES = [1, 4099, 1_000_003]  # a partial block, several blocks, a large odd size


@pytest.mark.parametrize("gdtype", GDTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_on_gpu_matches_torch_optim(case: str, n: int, gdtype: torch.dtype) -> None:
    rule, hp = CASES[case]
    torch.manual_seed(n + 7)
    loss_scale = 2.0 if gdtype == torch.float32 else 512.0
    p0 = torch.randn(n)
    grads = make_grads(n, len(LRS), gdtype, loss_scale)
    p = p0.cuda()
    state = init_state(rule, hp, [p])
    copy = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    for step, (g, lr) in enumerate(zip(grads, LRS), start=1):
        apply_update(rule, [p], [g.cuda()], state, lr=lr, step=step, hp=hp,
                     grad_scale=1.0 / loss_scale, model_copies=[copy], backend="triton")
    ref_p, ref_state = reference(rule, hp, p0, grads, 1.0 / loss_scale)
    cpu_state = {k: [t.cpu() for t in v] for k, v in state.items()}
    assert_matches(rule, hp, p.cpu(), cpu_state, ref_p, ref_state)
    # round to nearest even on the GPU: bit-exact with torch's conversion
    assert torch.equal(copy.cpu().view(torch.int16), p.cpu().to(torch.bfloat16).view(torch.int16))


def test_found_inf_on_gpu_leaves_everything_unchanged() -> None:
    rule, hp = CASES["adamw"]
    p = torch.randn(4099, device="cuda")
    state = init_state(rule, hp, [p])
    before = p.clone()
    apply_update(rule, [p], [torch.randn(4099, device="cuda")], state, lr=1e-3, step=1, hp=hp,
                 found_inf=torch.ones((), device="cuda"), backend="triton")
    assert torch.equal(p, before) and all(not t.any() for ts in state.values() for t in ts)


@pytest.mark.parametrize("gdtype", GDTYPES, ids=lambda d: str(d).split(".")[-1])
def test_grad_stats_on_gpu(gdtype: torch.dtype) -> None:
    torch.manual_seed(3)
    gs = [torch.randn(n).to(gdtype) for n in (1, 4099, 1_000_003)]
    out = grad_stats([g.cuda() for g in gs], backend="triton").cpu()
    want = sum(float(g.double().square().sum()) for g in gs)
    assert abs(float(out[0]) - want) <= 1e-5 * want and float(out[1]) == 0
    gs[1][7] = float("inf")
    gs[2][0] = float("nan")
    assert float(grad_stats([g.cuda() for g in gs], backend="triton")[1]) == 2


@pytest.mark.parametrize("n", [300, 1_000_003])
def test_adamw8bit_on_gpu_gives_the_cpu_paths_bits(n: int) -> None:
    from zeroshard import quant8 as Q

    torch.manual_seed(5)
    p0 = torch.randn(n)
    hp = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}
    out = {}
    for device, backend in (("cpu", "torch"), ("cuda", "triton")):
        p = p0.to(device)
        st = Q.init_state8(n, 256, device)
        for step in range(1, 4):
            g = torch.randn(n, generator=torch.Generator().manual_seed(step)).to(device)
            Q.adamw8bit_step_(p, g, *st.values(), step=step, block_size=256, backend=backend,
                              **hp)  # fmt: skip
        out[device] = (p.cpu(), {k: v.cpu() for k, v in st.items()})
    assert torch.equal(out["cuda"][0], out["cpu"][0])
    for k, v in out["cpu"][1].items():
        assert torch.equal(out["cuda"][1][k], v), k

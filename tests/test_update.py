"""zeroshard.update.apply (torch backend) against torch.optim, and a float64 reference for Lion.

The references here are shared with tests/test_kernels.py, which runs the same cases through the
Triton kernels under the interpreter.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.update_cases import (
    ADAM,
    CASES,
    GDTYPES,
    LION,
    LRS,
    SGD,
    assert_matches,
    make_grads,
    reference,
    run_ours,
)
from zeroshard.update import apply as update
from zeroshard.update import lion as update_lion
from zeroshard.update.apply import apply_update, grad_stats, init_state


@pytest.mark.parametrize("gdtype", GDTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("n", [0, 1, 1000, 100003])
@pytest.mark.parametrize("case", list(CASES))
def test_torch_path_matches_torch_optim(
    case: str, n: int, gdtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    rule, hp = CASES[case]
    # Small upcast chunks so 100003 low-precision grads cross many chunk boundaries.
    monkeypatch.setattr(update, "_UPCAST_CHUNK", 1 << 12)
    torch.manual_seed(n)
    loss_scale = 1.0 if gdtype == torch.float32 else 256.0
    p0 = torch.randn(n)
    grads = make_grads(n, len(LRS), gdtype, loss_scale)
    p, state, _ = run_ours(rule, hp, p0, grads, 1.0 / loss_scale, "torch")
    ref_p, ref_state = reference(rule, hp, p0, grads, 1.0 / loss_scale)
    if n:
        assert not torch.equal(p, p0)
    assert_matches(rule, hp, p, state, ref_p, ref_state)


@pytest.mark.parametrize("case", list(CASES))
def test_tensor_grad_scale(case: str) -> None:
    """A device-tensor grad scale (clip coefficient computed on device) acts like the float."""
    rule, hp = CASES[case]
    torch.manual_seed(0)
    p0, g = torch.randn(5000), torch.randn(5000) * 8
    ref_p, ref_state = reference(rule, hp, p0, [g], 0.125)
    p = p0.clone()
    state = init_state(rule, hp, [p])
    apply_update(rule, [p], [g.clone()], state, lr=LRS[0], step=1, hp=hp,
                 grad_scale=torch.tensor(0.125), backend="torch")
    assert_matches(rule, hp, p, state, ref_p, ref_state)


@pytest.mark.parametrize("copy_dtype", [torch.bfloat16, torch.float16],
                         ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", ["adamw", "sgd-momentum", "lion"])
def test_model_copy_rounds_like_torch(case: str, copy_dtype: torch.dtype) -> None:
    rule, hp = CASES[case]
    torch.manual_seed(1)
    p0 = torch.randn(40000)
    grads = make_grads(40000, 2, torch.float32, 1.0)
    p, _, copy = run_ours(rule, hp, p0, grads, 1.0, "torch", copy_dtype)
    assert copy is not None
    assert torch.equal(copy.view(torch.int16), p.to(copy_dtype).view(torch.int16))


def snapshot(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.clone() for t in tensors]


def bits_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x.view(torch.int32 if x.element_size() == 4 else torch.int16),
                           y.view(torch.int32 if y.element_size() == 4 else torch.int16))
               for x, y in zip(a, b))


@pytest.mark.parametrize("case", list(CASES))
def test_found_inf_skips_bit_for_bit(case: str, backend: str = "torch") -> None:
    rule, hp = CASES[case]
    torch.manual_seed(2)
    n = 3001
    p = torch.randn(n)
    state = init_state(rule, hp, [p])
    copy = p.to(torch.bfloat16)
    apply_update(rule, [p], [torch.randn(n)], state, lr=1e-2, step=1, hp=hp, backend=backend)
    before = snapshot(p, copy, *[s[0] for s in state.values()])
    g = torch.randn(n)
    g[7] = float("inf")
    g[9] = float("nan")
    apply_update(rule, [p], [g], state, lr=1e-2, step=2, hp=hp, grad_scale=0.5,
                 found_inf=torch.tensor(1.0), model_copies=[copy], backend=backend)
    assert bits_equal(before, [p, copy, *[s[0] for s in state.values()]])
    # A zero flag does update.
    apply_update(rule, [p], [torch.randn(n)], state, lr=1e-2, step=2, hp=hp,
                 found_inf=torch.tensor(0.0), model_copies=[copy], backend=backend)
    assert not torch.equal(p, before[0])
    assert torch.equal(copy, p.to(torch.bfloat16))


def test_several_pieces_and_views_into_one_buffer() -> None:
    """Pieces are views into one flat buffer, with mixed grad dtypes, updated in one call."""
    rule, hp = CASES["adamw"]
    torch.manual_seed(3)
    flat = torch.randn(3000)
    pieces = [flat[:1000], flat[1000:1001], flat[1001:]]
    grads = [torch.randn(1000), torch.randn(1).to(torch.bfloat16), torch.randn(1999)]
    refs = [reference(rule, hp, q.clone(), [g], 1.0) for q, g in zip(pieces, grads)]
    state = init_state(rule, hp, pieces)
    apply_update(rule, pieces, grads, state, lr=LRS[0], step=1, hp=hp, backend="torch")
    for i, (ref_p, ref_state) in enumerate(refs):
        assert_matches(rule, hp, flat[[0, 1000, 1001][i]:][: pieces[i].numel()],
                       {k: [v[i]] for k, v in state.items()}, ref_p, ref_state)


def test_init_state_names_and_shapes() -> None:
    p = [torch.zeros(3), torch.zeros(5)]
    assert set(init_state("adamw", ADAM, p)) == {"exp_avg", "exp_avg_sq"}
    s = init_state("adam", {**ADAM, "amsgrad": True}, p)
    assert set(s) == {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert [t.shape[0] for t in s["exp_avg"]] == [3, 5]
    assert all(t.dtype == torch.float32 and not t.any() for t in s["max_exp_avg_sq"])
    assert init_state("sgd", SGD, p) == {}
    assert set(init_state("sgd", {**SGD, "momentum": 0.9}, p)) == {"momentum_buffer"}
    assert set(init_state("lion", LION, p)) == {"exp_avg"}


def test_errors() -> None:
    p, g = [torch.zeros(4)], [torch.zeros(4)]
    st = init_state("adamw", ADAM, p)
    with pytest.raises(ValueError, match="unknown update rule"):
        apply_update("adagrad", p, g, st, lr=1.0, step=1, hp=ADAM)
    with pytest.raises(ValueError, match="unknown update rule"):
        init_state("adagrad", ADAM, p)
    with pytest.raises(ValueError, match="unknown backend"):
        apply_update("adamw", p, g, st, lr=1.0, step=1, hp=ADAM, backend="cuda")  # type: ignore
    with pytest.raises(ValueError, match="unknown backend"):
        grad_stats(g, backend="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="grads"):
        apply_update("adamw", p, g * 2, st, lr=1.0, step=1, hp=ADAM)
    with pytest.raises(ValueError, match="state"):
        apply_update("adamw", p, g, {"exp_avg": st["exp_avg"]}, lr=1.0, step=1, hp=ADAM)
    with pytest.raises(ValueError, match="elements"):
        apply_update("adamw", p, [torch.zeros(5)], st, lr=1.0, step=1, hp=ADAM)
    with pytest.raises(ValueError, match="model copies"):
        apply_update("adamw", p, g, st, lr=1.0, step=1, hp=ADAM, model_copies=[])


def test_auto_picks_torch_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("triton path taken for CPU tensors")

    monkeypatch.setattr(update, "_triton_update", boom)
    p = [torch.ones(8)]
    st = init_state("sgd", SGD, p)
    apply_update("sgd", p, [torch.ones(8)], st, lr=0.5, step=1, hp=SGD, backend="auto")
    assert torch.equal(p[0], torch.full((8,), 0.5))
    with pytest.raises(AssertionError, match="triton path"):
        apply_update("sgd", p, [torch.ones(8)], st, lr=0.5, step=1, hp=SGD, backend="triton")


def stats_reference(grads: list[torch.Tensor]) -> tuple[float, int]:
    finite = [g.double()[torch.isfinite(g)] for g in grads]
    nonfinite = sum(int((~torch.isfinite(g)).sum()) for g in grads)
    return float(sum((f * f).sum() for f in finite)), nonfinite


@pytest.mark.parametrize("gdtype", GDTYPES, ids=lambda d: str(d).split(".")[-1])
def test_grad_stats_matches_float64(gdtype: torch.dtype, backend: str = "torch") -> None:
    torch.manual_seed(4)
    grads = [torch.randn(n).to(gdtype) for n in (0, 1, 1000, 100003)]
    out = grad_stats(grads, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (2,)
    sumsq, count = stats_reference(grads)
    assert count == 0 and out[1].item() == 0
    assert out[0].item() == pytest.approx(sumsq, rel=1e-5)
    grads[2][10] = float("inf")
    grads[3][5] = float("nan")
    grads[3][6] = float("-inf")
    out = grad_stats(grads, backend=backend)
    assert out[1].item() == 3
    assert not torch.isfinite(out[0])


@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_lion_path(gdtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large CPU Lion pieces run a torch.compile'd kernel: same float64 reference."""
    if update_lion.compiled_lion() is None:
        pytest.skip("torch.compile unavailable here (no C++ toolchain?)")
    monkeypatch.setattr(update_lion, "COMPILE_MIN", 0)
    rule, hp = CASES["lion"]
    torch.manual_seed(5)
    p0 = torch.randn(5003)
    grads = make_grads(5003, len(LRS), gdtype, 64.0)
    p, state, _ = run_ours(rule, hp, p0, grads, 1.0 / 64, "torch")
    ref_p, ref_state = reference(rule, hp, p0, grads, 1.0 / 64)
    assert_matches(rule, hp, p, state, ref_p, ref_state)

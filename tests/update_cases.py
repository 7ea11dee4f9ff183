"""Update-rule cases, gradient makers and torch.optim references shared by the update (torch
path) and kernel (Triton) tests."""


from __future__ import annotations

from typing import Any

import torch

from zeroshard.update.apply import apply_update, init_state

ADAM = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
        "maximize": False}
SGD = {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0,
       "maximize": False}
LION = {"betas": (0.9, 0.99), "weight_decay": 0.0}

# (rule, hp) variants covering every option of every rule.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "adamw": ("adamw", {**ADAM, "weight_decay": 0.01}),
    "adamw-amsgrad-max": ("adamw", {**ADAM, "weight_decay": 0.1, "amsgrad": True,
                                    "maximize": True, "betas": (0.8, 0.99)}),
    "adam-l2": ("adam", {**ADAM, "weight_decay": 0.01, "eps": 1e-6}),
    "adam-amsgrad": ("adam", {**ADAM, "amsgrad": True}),
    "sgd": ("sgd", {**SGD, "weight_decay": 1e-3}),
    "sgd-momentum": ("sgd", {**SGD, "momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-2}),
    "sgd-nesterov-max": ("sgd", {**SGD, "momentum": 0.8, "nesterov": True,
                                 "weight_decay": 1e-2, "maximize": True}),
    "lion": ("lion", {**LION, "weight_decay": 0.1}),
}
LRS = (1e-3, 3e-3, 5e-4)  # a schedule: lr changes every step
GDTYPES = (torch.float32, torch.bfloat16, torch.float16)


def make_grads(n: int, steps: int, dtype: torch.dtype, loss_scale: float) -> list[torch.Tensor]:
    """Grads as the optimizer sees them: multiplied by a loss scale, in the grad dtype."""
    return [(torch.randn(n) * loss_scale).to(dtype) for _ in range(steps)]


def reference(
    rule: str, hp: dict[str, Any], p0: torch.Tensor, grads: list[torch.Tensor],
    scale: float, lrs: tuple[float, ...] = LRS,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Params and states after len(grads) steps of torch.optim (float64 by hand for Lion)."""
    if rule == "lion":
        p, m = p0.double(), torch.zeros(p0.shape, dtype=torch.float64)
        b1, b2 = hp["betas"]
        tie = torch.zeros(p0.shape, dtype=torch.bool)
        for g, lr in zip(grads, lrs):
            g = g.double() * scale
            c = b1 * m + (1 - b1) * g
            # sign(c) of a c within fp32 rounding of zero is a coin toss in any fp32 kernel.
            tie |= c.abs() <= 1e-6 * (m.abs() + g.abs())
            p = p * (1 - lr * hp["weight_decay"]) - lr * c.sign()
            m = b2 * m + (1 - b2) * g
        p[tie] = float("nan")  # marks elements assert_matches leaves out
        return p, {"exp_avg": m}
    param = torch.nn.Parameter(p0.clone())
    if rule == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD([param], lr=lrs[0], foreach=False, **hp)
    else:
        cls = torch.optim.AdamW if rule == "adamw" else torch.optim.Adam
        opt = cls([param], lr=lrs[0], foreach=False, **hp)
    for g, lr in zip(grads, lrs):
        opt.param_groups[0]["lr"] = lr
        param.grad = g.float() * scale
        opt.step()
    st = opt.state[param]
    return param.detach(), {k: v for k, v in st.items() if k != "step" and v is not None}


def run_ours(
    rule: str, hp: dict[str, Any], p0: torch.Tensor, grads: list[torch.Tensor], scale: float,
    backend: str, copy_dtype: torch.dtype | None = None, lrs: tuple[float, ...] = LRS,
) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]], torch.Tensor | None]:
    p = p0.clone()
    state = init_state(rule, hp, [p])
    copy = None if copy_dtype is None else torch.empty(p.numel(), dtype=copy_dtype)
    for step, (g, lr) in enumerate(zip(grads, lrs), start=1):
        apply_update(rule, [p], [g.clone()], state, lr=lr, step=step, hp=hp,
                     grad_scale=None if scale == 1.0 else scale,
                     model_copies=None if copy is None else [copy], backend=backend)
    return p, state, copy


def assert_matches(rule: str, hp: dict[str, Any], p: torch.Tensor,
                   state: dict[str, list[torch.Tensor]], ref_p: torch.Tensor,
                   ref_state: dict[str, torch.Tensor]) -> None:
    # 1e-6 relative on params; atol covers params that happen to sit near zero.
    keep = ~ref_p.isnan()  # Lion: elements whose update sign was a tie (a handful at most)
    assert int((~keep).sum()) <= max(2, p.numel() // 10000)
    torch.testing.assert_close(p.double()[keep], ref_p.double()[keep], rtol=1e-6, atol=1e-7)
    assert set(state) == set(ref_state)
    for k, ref in ref_state.items():
        # Moments are only as precise as fp32 (1 - beta) terms and cancel near zero; they feed
        # the params checked above.
        atol = 1e-6 * float(ref.abs().max()) if ref.numel() else 0.0
        torch.testing.assert_close(state[k][0].double(), ref.double(), rtol=2e-5, atol=atol)

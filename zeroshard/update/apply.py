"""One entry point per optimizer step, whatever kernel runs it.

The optimizer calls `apply_update` on flat 1-D fp32 master pieces and never learns which backend
ran: fused Triton kernels (`zeroshard_kernels`) on CUDA tensors, torch's own fused CPU kernels
(`torch._fused_adamw_`, `_fused_adam_`, `_fused_sgd_`) elsewhere. Those run at memory bandwidth
on CPU; the foreach path is 6-8x slower. Lion has no torch fused kernel: its torch path is in
lion.py.

Grads are inputs only, but the torch backend may overwrite fp32 grads with their scaled value
(torch's fused kernels write the unscaled grad back); callers must treat grads as consumed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from zeroshard.update.buffers import scalar, scratch
from zeroshard.update.lion import torch_lion

RULES = ("adamw", "adam", "sgd", "lion")
BACKENDS = ("auto", "triton", "torch")
Backend = Literal["auto", "triton", "torch"]

# Low-precision grads are upcast through a reused scratch buffer in chunks of this many elements
# (4 MB fp32: stays in L3 between the upcast and the fused kernel, no shard-sized allocation).
_UPCAST_CHUNK = 1 << 20

__all__ = ["RULES", "BACKENDS", "Backend", "init_state", "apply_update", "grad_stats"]


# --------------------------------------------------------------------------------------------
# state


def _state_names(rule: str, hp: Mapping[str, Any]) -> tuple[str, ...]:
    if rule in ("adamw", "adam"):
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if hp["amsgrad"] else ())
    if rule == "sgd":
        return ("momentum_buffer",) if hp["momentum"] != 0 else ()
    if rule == "lion":
        return ("exp_avg",)
    if rule == "adamw8bit":
        return ()  # its state codec creates and stores the state (zeroshard.quant8.codec)
    raise ValueError(f"unknown update rule {rule!r}; expected one of {RULES}")


def init_state(
    rule: str, hp: Mapping[str, Any], params: Sequence[Tensor]
) -> dict[str, list[Tensor]]:
    """fp32 zero state tensors shaped like each 1-D master piece in `params`.

    adam/adamw: exp_avg, exp_avg_sq (+ max_exp_avg_sq if hp['amsgrad']); sgd: momentum_buffer
    (only if hp['momentum'] != 0); lion: exp_avg.
    """
    return {
        name: [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
        for name in _state_names(rule, hp)
    }


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if backend in ("triton", "torch"):
        return backend
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def _check(
    rule: str,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: Mapping[str, Sequence[Tensor]],
    names: tuple[str, ...],
    model_copies: Sequence[Tensor] | None,
) -> None:
    n = len(params)
    if len(grads) != n:
        raise ValueError(f"{len(grads)} grads for {n} params")
    for name in names:
        if name not in state:
            raise ValueError(f"rule {rule!r} needs state {name!r}; got {sorted(state)}")
        if len(state[name]) != n:
            raise ValueError(f"state {name!r} has {len(state[name])} tensors for {n} params")
    if model_copies is not None and len(model_copies) != n:
        raise ValueError(f"{len(model_copies)} model copies for {n} params")
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.dtype != torch.float32 or p.dim() != 1 or not p.is_contiguous():
            raise ValueError(f"params[{i}] must be a contiguous 1-D fp32 tensor")
        if g.numel() != p.numel():
            raise ValueError(f"grads[{i}] has {g.numel()} elements, params[{i}] {p.numel()}")
        if model_copies is not None and model_copies[i].numel() != p.numel():
            raise ValueError(f"model_copies[{i}] has {model_copies[i].numel()} elements")


# --------------------------------------------------------------------------------------------
# public API


def apply_update(
    rule: str,
    params: list[Tensor],
    grads: list[Tensor],
    state: dict[str, list[Tensor]],
    *,
    lr: float,
    step: int,
    hp: Mapping[str, Any],
    grad_scale: float | Tensor | None = None,
    found_inf: Tensor | None = None,
    model_copies: list[Tensor] | None = None,
    backend: Backend = "auto",
) -> None:
    """In-place update of flat 1-D fp32 master pieces `params[i]` with `grads[i]`.

    grads: fp32/bf16/fp16, same numel; `step`: 1-based count of this update (already
    incremented); `grad_scale` multiplies the grads (1/loss_scale x clip coefficient);
    `found_inf` (0-d float, nonzero => skip: params and states bit-for-bit unchanged);
    `model_copies` (bf16/fp16) receive the updated params rounded to nearest even.
    torch.optim semantics per rule (Lion: the paper's).
    """
    names = _state_names(rule, hp)
    _check(rule, params, grads, state, names, model_copies)
    if not params:
        resolve_backend(backend, torch.device("cpu"))
        return
    device = params[0].device
    if resolve_backend(backend, device) == "triton":
        _triton_update(rule, params, grads, state, lr=lr, step=step, hp=hp,
                       grad_scale=grad_scale, found_inf=found_inf, model_copies=model_copies)
        return

    if found_inf is not None and device.type == "cpu":
        # On CPU reading the flag costs nothing; skipping here also leaves model copies alone.
        if float(found_inf) != 0.0:
            return
        found_inf = None
    if isinstance(grad_scale, Tensor):
        scale: float | Tensor | None = grad_scale.to(device=device, dtype=torch.float32)
    elif grad_scale is None or float(grad_scale) == 1.0:
        scale = None
    else:
        scale = float(grad_scale)

    if rule == "lion":
        torch_lion(params, grads, state["exp_avg"], lr=lr, hp=hp, scale=scale,
                    found_inf=found_inf)
    else:
        # torch's fused kernels divide by grad_scale: hand them the reciprocal.
        if scale is None:
            inv = None
        elif isinstance(scale, Tensor):
            inv = torch.reciprocal(scale)
        else:
            inv = scalar(device, "inv_scale", 1.0 / scale)
        if rule in ("adamw", "adam"):
            _torch_adam(rule, params, grads, state, names, lr=lr, step=step, hp=hp,
                        inv=inv, found_inf=found_inf)
        else:
            _torch_sgd(params, grads, state, names, lr=lr, step=step, hp=hp, inv=inv,
                       found_inf=found_inf)

    if model_copies is not None:
        skip = None if found_inf is None else found_inf != 0
        for p, c in zip(params, model_copies):
            if skip is None:
                c.view(-1).copy_(p)
            else:
                c.view(-1).copy_(torch.where(skip, c.view(-1), p.to(c.dtype)))


def grad_stats(grads: Sequence[Tensor], backend: Backend = "auto") -> Tensor:
    """fp32 [sum of squares of all elements, number of non-finite elements] over all grads.

    One pass on the grads' device, so global-norm clipping and the inf/nan check cost a single
    read of the grads and one all-reduce of a pair.
    """
    device = grads[0].device if grads else torch.device("cpu")
    if resolve_backend(backend, device) == "triton":
        from zeroshard_kernels import grad_stats as triton_grad_stats

        return triton_grad_stats(list(grads))
    if not grads:
        return torch.zeros(2, dtype=torch.float32)
    sq = []
    for g in grads:
        g = g.reshape(-1)
        if g.dtype == torch.float32:
            sq.append(torch.dot(g, g))
        else:
            sq.append(torch.linalg.vector_norm(g, dtype=torch.float32).square())
    sumsq = torch.stack(sq).sum() if len(sq) > 1 else sq[0]
    if device.type == "cpu" and math.isfinite(float(sumsq)):
        # Finite sum of squares => no inf/nan anywhere: skip the counting pass.
        count = torch.zeros((), dtype=torch.float32)
    else:
        count = sum(
            (~torch.isfinite(g)).sum(dtype=torch.float32) for g in grads
        )  # type: ignore[assignment]
    return torch.stack([sumsq.to(torch.float32), torch.as_tensor(count, device=device)])


# --------------------------------------------------------------------------------------------
# triton backend: one launch per piece, lr/step/scale/found_inf read on the device


def _triton_update(
    rule: str,
    params: list[Tensor],
    grads: list[Tensor],
    state: dict[str, list[Tensor]],
    *,
    lr: float,
    step: int,
    hp: Mapping[str, Any],
    grad_scale: float | Tensor | None,
    found_inf: Tensor | None,
    model_copies: list[Tensor] | None,
) -> None:
    try:
        import zeroshard_kernels as K
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("backend='triton' needs triton and the zeroshard_kernels package") from e
    device = params[0].device
    lr_t = scalar(device, "lr", float(lr))
    if isinstance(grad_scale, Tensor):
        scale_t: Tensor | None = grad_scale.to(device=device, dtype=torch.float32)
    elif grad_scale is None or float(grad_scale) == 1.0:
        scale_t = None
    else:
        scale_t = scalar(device, "scale", float(grad_scale))
    copies: Sequence[Tensor | None] = (
        [c.view(-1) for c in model_copies] if model_copies is not None else [None] * len(params)
    )
    common = dict(lr=lr_t, grad_scale=scale_t, found_inf=found_inf)
    if rule in ("adamw", "adam"):
        step_t = scalar(device, "step", float(step))
        beta1, beta2 = hp["betas"]
        amsgrad = bool(hp["amsgrad"])
        for i, (p, g) in enumerate(zip(params, grads)):
            K.adam_update(p, g.view(-1), state["exp_avg"][i], state["exp_avg_sq"][i],
                          state["max_exp_avg_sq"][i] if amsgrad else None, step=step_t,
                          beta1=float(beta1), beta2=float(beta2), eps=float(hp["eps"]),
                          weight_decay=float(hp["weight_decay"]), decoupled=rule == "adamw",
                          maximize=bool(hp["maximize"]), model_copy=copies[i], **common)
    elif rule == "sgd":
        step_t = scalar(device, "step", float(step))
        momentum = float(hp["momentum"])
        for i, (p, g) in enumerate(zip(params, grads)):
            K.sgd_update(p, g.view(-1), state["momentum_buffer"][i] if momentum != 0 else None,
                         step=step_t, momentum=momentum, dampening=float(hp["dampening"]),
                         nesterov=bool(hp["nesterov"]), weight_decay=float(hp["weight_decay"]),
                         maximize=bool(hp["maximize"]), model_copy=copies[i], **common)
    else:
        beta1, beta2 = hp["betas"]
        for i, (p, g) in enumerate(zip(params, grads)):
            K.lion_update(p, g.view(-1), state["exp_avg"][i], beta1=float(beta1),
                          beta2=float(beta2), weight_decay=float(hp["weight_decay"]),
                          model_copy=copies[i], **common)


# --------------------------------------------------------------------------------------------
# torch backend


def _run_fused(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[list[Tensor]],
    launch: Any,
) -> None:
    """Call `launch(params, grads, states)` once for all same-dtype grads; low-precision grads go
    through an fp32 scratch chunk (torch's fused kernels need grads in the params' dtype)."""
    same = [i for i, (p, g) in enumerate(zip(params, grads)) if g.dtype == p.dtype]
    if same:
        launch([params[i] for i in same], [grads[i].view(-1) for i in same],
               [[s[i] for i in same] for s in states])
    for i, (p, g) in enumerate(zip(params, grads)):
        if g.dtype == p.dtype:
            continue
        g = g.reshape(-1)
        n = p.numel()
        buf = scratch(p.device, min(n, _UPCAST_CHUNK))
        for lo in range(0, n, _UPCAST_CHUNK):
            hi = min(lo + _UPCAST_CHUNK, n)
            gs = buf[: hi - lo]
            gs.copy_(g[lo:hi])
            launch([p[lo:hi]], [gs], [[s[i][lo:hi]] for s in states])


def _torch_adam(
    rule: str,
    params: list[Tensor],
    grads: list[Tensor],
    state: dict[str, list[Tensor]],
    names: tuple[str, ...],
    *,
    lr: float,
    step: int,
    hp: Mapping[str, Any],
    inv: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    fn = torch._fused_adamw_ if rule == "adamw" else torch._fused_adam_
    beta1, beta2 = hp["betas"]
    amsgrad = bool(hp["amsgrad"])
    step_t = scalar(params[0].device, "step", float(step))

    def launch(p: list[Tensor], g: list[Tensor], s: list[list[Tensor]]) -> None:
        fn(p, g, s[0], s[1], s[2] if amsgrad else [], [step_t] * len(p), lr=lr,
           beta1=float(beta1), beta2=float(beta2), weight_decay=float(hp["weight_decay"]),
           eps=float(hp["eps"]), amsgrad=amsgrad, maximize=bool(hp["maximize"]),
           grad_scale=inv, found_inf=found_inf)

    _run_fused(params, grads, [state[k] for k in names], launch)


def _torch_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    state: dict[str, list[Tensor]],
    names: tuple[str, ...],
    *,
    lr: float,
    step: int,
    hp: Mapping[str, Any],
    inv: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    momentum = float(hp["momentum"])
    if hp["nesterov"] and (momentum <= 0 or float(hp["dampening"]) != 0):
        raise ValueError("nesterov momentum requires a momentum and zero dampening")

    def launch(p: list[Tensor], g: list[Tensor], s: list[list[Tensor]]) -> None:
        torch._fused_sgd_(p, g, s[0] if s else [], weight_decay=float(hp["weight_decay"]),
                          momentum=momentum, lr=lr, dampening=float(hp["dampening"]),
                          nesterov=bool(hp["nesterov"]), maximize=bool(hp["maximize"]),
                          is_first_step=step == 1, grad_scale=inv, found_inf=found_inf)

    _run_fused(params, grads, [state[k] for k in names], launch)

"""Lion on CPU: torch has no fused Lion kernel, so large pieces run a torch.compile'd one-pass
kernel and the rest eager ops over cache-sized chunks (one trip to DRAM per tensor instead of
one per op). Off CPU without Triton, the same chunked path runs with an inf/nan skip flag.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from zeroshard.update.buffers import scalar, scratch

# The eager path works on chunks small enough that its 5 ops hit L2, not DRAM.
CHUNK = 1 << 16
# From this many elements on, CPU Lion runs a torch.compile'd one-pass kernel (2.4x faster than
# the chunked eager ops here) when compilation works; its one-off compile (~3-30 s) would
# dominate small pieces. ZEROSHARD_NO_COMPILE=1 disables it.
COMPILE_MIN = 1 << 22


def torch_lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float,
    hp: Mapping[str, Any],
    scale: float | Tensor | None,
    found_inf: Tensor | None,
) -> None:
    beta1, beta2 = (float(b) for b in hp["betas"])
    decay = 1.0 - lr * float(hp["weight_decay"])
    for p, g, m in zip(params, grads, exp_avgs):
        g = g.reshape(-1)
        n = p.numel()
        if found_inf is None and p.device.type == "cpu" and n >= COMPILE_MIN:
            fn = compiled_lion()
            if fn is not None:
                dev = p.device
                sc = scale if isinstance(scale, Tensor) else scalar(
                    dev, "lion_scale", 1.0 if scale is None else scale)
                fn(p, g, m, scalar(dev, "lr", lr), scalar(dev, "lion_decay", decay),
                   scalar(dev, "lion_b1", beta1), scalar(dev, "lion_b2", beta2), sc)
                continue
        if found_inf is not None:  # off-CPU only: keep the old values where the flag is set
            p_old, m_old = p.clone(), m.clone()
        chunk = CHUNK if p.device.type == "cpu" else max(n, 1)
        buf = scratch(p.device, 2 * min(n, chunk))
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            gc, mc, pc = g[lo:hi], m[lo:hi], p[lo:hi]
            c, gs = buf[: hi - lo], buf[hi - lo : 2 * (hi - lo)]
            if scale is not None:
                torch.mul(gc, scale, out=gs)
                gc = gs
            elif gc.dtype != torch.float32:
                gs.copy_(gc)
                gc = gs
            torch.lerp(mc, gc, 1.0 - beta1, out=c)  # b1*m + (1-b1)*g
            c.sign_()
            if decay != 1.0:
                pc.mul_(decay)
            pc.sub_(c, alpha=lr)
            mc.lerp_(gc, 1.0 - beta2)  # b2*m + (1-b2)*g
        if found_inf is not None:
            skip = found_inf != 0
            p.copy_(torch.where(skip, p_old, p))
            m.copy_(torch.where(skip, m_old, m))


def _lion_flat(p: Tensor, g: Tensor, m: Tensor, lr: Tensor, decay: Tensor, beta1: Tensor,
               beta2: Tensor, scale: Tensor) -> None:
    """Lion on one flat piece; compiled into a single pass (scalars are 0-d tensors so that
    lr schedules and new pieces' sizes do not recompile)."""
    g = g.float() * scale
    c = (m * beta1 + g * (1 - beta1)).sign()
    p.copy_(p * decay - lr * c)
    m.copy_(m * beta2 + g * (1 - beta2))


_COMPILED: list[Any] = []  # [] untried; [fn] compiled; [None] unavailable


def compiled_lion() -> Any:
    """The compiled one-pass kernel, compiled on first use; None where torch.compile fails."""
    if not _COMPILED:
        fn = None
        if os.environ.get("ZEROSHARD_NO_COMPILE", "0") != "1":
            try:
                fn = torch.compile(_lion_flat, dynamic=True)
                z = torch.zeros(8)
                one = torch.ones(())
                fn(z.clone(), z.clone(), z.clone(), one, one, one, one, one)  # compile now
            except Exception:  # no compiler toolchain, unsupported platform: eager chunks
                fn = None
        _COMPILED.append(fn)
    return _COMPILED[0]

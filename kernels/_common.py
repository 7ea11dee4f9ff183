"""Launch geometry and helpers shared by the update kernels.

On a GPU each kernel is autotuned over BLOCK/num_warps (BLOCK 1024-4096 with 4-8 warps gives each
thread 4-8 contiguous fp32 elements: 128-bit `ld.global.v4` accesses). The kernels update their
inputs in place, so autotuning snapshots and restores them around each benchmarked config.
Under the interpreter (`TRITON_INTERPRET=1`, CPU tensors) there is no benchmarker and cost is per
program: one fixed, large BLOCK.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: BLOCK used under the interpreter (tests size their cases around it).
INTERPRET_BLOCK = 16384
GPU_CONFIGS = [
    triton.Config({"BLOCK": block}, num_warps=warps)
    for block in (1024, 2048, 4096)
    for warps in (4, 8)
]


def size_class(n: int) -> int:
    """Autotune key: small shards (launch-bound) and large ones (bandwidth-bound) tune apart."""
    return 0 if n < (1 << 20) else 1


def autotuned(kernel: Any, inplace: Sequence[str]) -> Any:
    """`kernel` autotuned on GPU; `inplace` args (None allowed) are restored after each config."""
    saved: dict[str, torch.Tensor] = {}

    def pre_hook(kwargs: dict[str, Any], reset_only: bool = False) -> None:
        if not reset_only:
            saved.update({k: kwargs[k].clone() for k in inplace if kwargs.get(k) is not None})

    def post_hook(kwargs: dict[str, Any], exception: Any) -> None:
        for k, v in saved.items():
            kwargs[k].copy_(v)
        saved.clear()

    return triton.autotune(GPU_CONFIGS, key=["SIZE_CLASS"], pre_hook=pre_hook,
                           post_hook=post_hook)(kernel)


def launch(kernel: Any, tuned: Any, n: int, *args: Any, **kwargs: Any) -> None:
    """Run `tuned` on CUDA tensors, else `kernel` with the interpreter's fixed BLOCK."""
    if n == 0:
        return
    if args[0].is_cuda and not INTERPRET:
        tuned[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](
            *args, SIZE_CLASS=size_class(n), **kwargs)
    else:
        kernel[(triton.cdiv(n, INTERPRET_BLOCK),)](
            *args, SIZE_CLASS=0, BLOCK=INTERPRET_BLOCK, **kwargs)


def check_piece(name: str, t: torch.Tensor | None, like: torch.Tensor,
                dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> None:
    """Kernels index flat memory: every operand must be contiguous, same numel, same device."""
    if t is None:
        return
    if t.numel() != like.numel() or not t.is_contiguous() or t.device != like.device:
        raise ValueError(f"{name} must be contiguous with {like.numel()} elements on {like.device}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be one of {dtypes}, got {t.dtype}")


GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
COPY_DTYPES = (torch.bfloat16, torch.float16)


@triton.jit
def store_copy(copy_ptr, offs, x, mask):
    """Store fp32 `x` into the bf16/fp16 model copy, rounded to nearest even.

    bf16 is rounded with integer ops: the interpreter truncates `.to(tl.bfloat16)`, and on GPU
    this compiles to the same few ALU ops the conversion would take.
    """
    if copy_ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        hi = tl.where(x != x, 0x7FC0, bits >> 16).to(tl.uint16)
        tl.store(copy_ptr + offs, hi.to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(copy_ptr + offs, x.to(copy_ptr.dtype.element_ty), mask=mask)

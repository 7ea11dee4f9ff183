"""AdamW with blockwise 8-bit states vs the fp32 fused step: time and bytes per parameter.

The fp32 baseline is what zeroshard's update runs on a flat CPU shard (`torch._fused_adamw_`,
one flat tensor per state); the 8-bit step is `zeroshard.quant8.adamw8bit_step_` (the CPU
path; on a GPU the Triton kernel). Both are interleaved in every repeat so machine drift hits
them alike; medians and the ratio 8-bit / fp32 measured in the same run are printed.

    python bench/bench_adamw8bit.py --threads 1
    python bench/bench_adamw8bit.py --sizes 1e6 4e6 16e6 --grad-dtype bf16 --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", type=float, default=[1e6, 4e6, 16e6])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--grad-dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--block-size", type=int, default=256)
    return ap.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads:
    os.environ["OMP_NUM_THREADS"] = str(ARGS.threads)  # before torch starts OpenMP

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zeroshard import quant8 as Q  # noqa: E402

HP = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}


def bytes_per_param(grad_bytes: int, block: int) -> dict[str, float]:
    """Bytes each step must move per element, and optimizer-state bytes held per element."""
    # fp32: read p, g, m, v; write p, m, v. 8-bit: read p, g, 2 codes; write p, 2 codes; plus
    # two absmax per block, each read and written.
    return {
        "moved_fp32": 4 + grad_bytes + 8 + 4 + 8,
        "moved_8bit": 4 + grad_bytes + 2 + 4 + 2 + 16 / block,
        "held_fp32": 8.0,
        "held_8bit": 2 + 8 / block,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    args = ARGS
    assert args is not None
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gdt = torch.float32 if args.grad_dtype == "fp32" else torch.bfloat16
    bs = args.block_size
    b = bytes_per_param(2 if gdt == torch.bfloat16 else 4, bs)
    print(f"device {device}, threads {torch.get_num_threads()}, grads {args.grad_dtype}, "
          f"block {bs}, {args.repeats} repeats (median ms)")
    print(f"bytes moved per param: fp32 {b['moved_fp32']:.2f}, 8-bit {b['moved_8bit']:.3f} "
          f"(ratio {b['moved_8bit'] / b['moved_fp32']:.3f}); state bytes held per param: fp32 "
          f"{b['held_fp32']:.0f}, 8-bit {b['held_8bit']:.4f} "
          f"(ratio {b['held_8bit'] / b['held_fp32']:.3f})")
    print("| n | fp32 fused ms | 8-bit ms | time ratio | fp32 GB/s | 8-bit GB/s |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        n = int(size)
        f32, q8 = _bench_size(n, device, gdt, bs, args.warmup, args.repeats)
        print(f"| {n / 1e6:g}M | {f32 * 1e3:.2f} | {q8 * 1e3:.2f} | {q8 / f32:.2f} | "
              f"{b['moved_fp32'] * n / f32 / 1e9:.1f} | {b['moved_8bit'] * n / q8 / 1e9:.1f} |")


def _bench_size(n: int, device: torch.device, gdt: torch.dtype, bs: int, warmup: int,
                repeats: int) -> tuple[float, float]:
    """Median seconds of the fp32 fused step and of the 8-bit step on n elements."""
    torch.manual_seed(0)
    p32, g = torch.randn(n, device=device), torch.randn(n, device=device).to(gdt)
    # torch's fused kernel needs grads in the param dtype: the upcast is not timed.
    g32 = g.float()
    m32, v32 = torch.zeros_like(p32), torch.zeros_like(p32)
    step_t = torch.zeros((), device=device)
    p8 = p32.clone()
    st = Q.init_state8(n, bs, device)
    t8 = [0]

    def fp32_step() -> None:
        step_t.add_(1)
        torch._fused_adamw_([p32], [g32], [m32], [v32], [], [step_t], lr=HP["lr"],
                            beta1=HP["beta1"], beta2=HP["beta2"],
                            weight_decay=HP["weight_decay"], eps=HP["eps"], amsgrad=False,
                            maximize=False)

    def q8_step() -> None:
        t8[0] += 1
        Q.adamw8bit_step_(p8, g, *st.values(), step=t8[0], block_size=bs, **HP)

    times: dict[str, list[float]] = {"fp32": [], "8bit": []}
    for r in range(warmup + repeats):
        for name, fn in (("fp32", fp32_step), ("8bit", q8_step)):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return statistics.median(times["fp32"]), statistics.median(times["8bit"])

if __name__ == "__main__":
    main()

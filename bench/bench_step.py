"""Time one optimizer step per rule: zeroshard vs torch.optim (foreach, fused) vs DeepSpeed.

The update step is pure memory traffic, so each result is also given as effective bandwidth
(bytes the step must move / time) and as a ratio to a plain copy measured in the same process.
Implementations are interleaved within each repeat (drift hits all alike); median and spread
(min-max) are reported. The same command runs on a GPU (CUDA events, Triton kernels, apex-free
DeepSpeed FusedAdam) and on CPU (torch fused kernels, DeepSpeedCPUAdam).

    python bench/bench_step.py --threads 1            # CPU, single thread
    python bench/bench_step.py --sizes 1e7 --rules adamw --repeats 30

DeepSpeed is optional: rows for it are skipped when it is not installed or its op fails to
build. Writes <out>.json and <out>.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", type=float, default=[1e7, 5e7])
    ap.add_argument("--rules", nargs="+", default=["adamw", "adam", "sgd", "lion"])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--no-deepspeed", action="store_true")
    ap.add_argument("--out", default="bench/results/bench_step")
    return ap.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads:
    os.environ["OMP_NUM_THREADS"] = str(ARGS.threads)  # before torch/DeepSpeed start OpenMP

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zeroshard.update.apply import apply_update, init_state  # noqa: E402

HP: dict[str, dict[str, Any]] = {
    "adamw": {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "amsgrad": False,
              "maximize": False},
    "adam": {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
             "maximize": False},
    "sgd": {"momentum": 0.9, "dampening": 0.0, "nesterov": False, "weight_decay": 1e-4,
            "maximize": False},
    "lion": {"betas": (0.9, 0.99), "weight_decay": 0.1},
}
# Bytes one fp32 step must move per element (read + write), see kernels/*.py.
BYTES = {"adamw": 28, "adam": 28, "sgd": 20, "lion": 20}
LR = 1e-3
Step = Callable[[], None]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Step, device: torch.device) -> float:
    """Seconds for one call, the device drained before and after."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _tensors(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, device=device), torch.randn(n, device=device) * 1e-2


def make_zeroshard(rule: str, n: int, device: torch.device) -> Step:
    p, g = _tensors(n, device)
    state = init_state(rule, HP[rule], [p])
    count = [0]

    def step() -> None:
        count[0] += 1
        apply_update(rule, [p], [g], state, lr=LR, step=count[0], hp=HP[rule])

    return step


def make_lion_eager(n: int, device: torch.device) -> Step:
    """lucidrains/lion-pytorch's update (torch has no Lion): one full pass per tensor op."""
    p, g = _tensors(n, device)
    m = torch.zeros_like(p)
    (b1, b2), wd = HP["lion"]["betas"], HP["lion"]["weight_decay"]

    def step() -> None:
        p.mul_(1 - LR * wd)
        update = m.clone().mul_(b1).add(g, alpha=1 - b1).sign_()
        p.add_(update, alpha=-LR)
        m.mul_(b2).add_(g, alpha=1 - b2)

    return step


def make_torch(rule: str, n: int, device: torch.device, impl: str) -> Step | None:
    cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}.get(rule)
    if cls is None:
        return make_lion_eager(n, device) if impl == "foreach" else None
    p, g = _tensors(n, device)
    param = torch.nn.Parameter(p)
    param.grad = g
    opt = cls([param], lr=LR, **HP[rule], **{impl: True})
    return opt.step  # type: ignore[return-value]


def make_deepspeed(rule: str, n: int, device: torch.device) -> Step | None:
    if rule not in ("adamw", "adam"):
        return None
    try:
        if device.type == "cuda":
            from deepspeed.ops.adam import FusedAdam as DSAdam
        else:
            from deepspeed.ops.adam import DeepSpeedCPUAdam as DSAdam
    except Exception as e:  # not installed / incompatible: skip cleanly
        print(f"# deepspeed unavailable: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    p, g = _tensors(n, device)
    param = torch.nn.Parameter(p)
    param.grad = g
    hp = HP[rule]
    try:
        mode = {"adam_w_mode" if device.type == "cuda" else "adamw_mode": rule == "adamw"}
        opt = DSAdam([param], lr=LR, betas=hp["betas"], eps=hp["eps"],
                     weight_decay=hp["weight_decay"], **mode)
        opt.step()  # JIT-builds the op on first use
    except Exception as e:
        print(f"# deepspeed {rule} skipped: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    return opt.step  # type: ignore[return-value]


def make_copy(n: int, device: torch.device) -> Step:
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    return lambda: dst.copy_(src)  # type: ignore[return-value]


def bench(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev)
    results: list[dict[str, Any]] = []
    for size in args.sizes:
        n = int(size)
        for rule in args.rules:
            cands: dict[str, Step | None] = {
                "copy": make_copy(n, device),
                "zeroshard": make_zeroshard(rule, n, device),
                # Lion: lucidrains' eager ops under this name (torch.optim has no Lion).
                "torch-foreach": make_torch(rule, n, device, "foreach"),
                "torch-fused": make_torch(rule, n, device, "fused"),
            }
            if not args.no_deepspeed:
                cands["deepspeed"] = make_deepspeed(rule, n, device)
            steps = {k: v for k, v in cands.items() if v is not None}
            for fn in steps.values():
                for _ in range(args.warmup):
                    fn()
            times: dict[str, list[float]] = {k: [] for k in steps}
            for _ in range(args.repeats):  # interleaved
                for k, fn in steps.items():
                    times[k].append(_timed(fn, device))
            copy_bw = 8 * n / statistics.median(times["copy"])
            row: dict[str, Any] = {"n": n, "rule": rule, "copy_GBps": copy_bw / 1e9, "impl": {}}
            for k, ts in times.items():
                if k == "copy":
                    continue
                med = statistics.median(ts)
                row["impl"][k] = {
                    "ms": med * 1e3, "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3,
                    "GBps": BYTES[rule] * n / med / 1e9,
                    "vs_copy": BYTES[rule] * n / med / copy_bw,
                }
            zs = row["impl"]["zeroshard"]["ms"]
            for r in row["impl"].values():
                r["zeroshard_speedup"] = r["ms"] / zs  # >1: zeroshard faster
            results.append(row)
            _print_row(row)
            del cands, steps
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "repeats": args.repeats, "results": results,
    }


def _print_row(row: dict[str, Any]) -> None:
    print(f"\n{row['rule']}  n={row['n'] / 1e6:g}M  copy {row['copy_GBps']:.1f} GB/s")
    print(f"  {'impl':<14}{'ms':>9}{'min-max':>17}{'GB/s':>8}{'/copy':>7}{'zs speedup':>12}")
    for k, r in row["impl"].items():
        print(f"  {k:<14}{r['ms']:9.2f}{r['min_ms']:8.2f}-{r['max_ms']:<8.2f}{r['GBps']:8.1f}"
              f"{r['vs_copy']:7.2f}{r['zeroshard_speedup']:12.2f}")


def _plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib missing: no chart", file=sys.stderr)
        return
    rows = report["results"]
    impls = sorted({k for r in rows for k in r["impl"]})
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows)), 4))
    width = 0.8 / len(impls)
    for j, impl in enumerate(impls):
        xs = [i + j * width for i, r in enumerate(rows) if impl in r["impl"]]
        ys = [r["impl"][impl]["GBps"] for r in rows if impl in r["impl"]]
        ax.bar(xs, ys, width, label=impl)
    for i, r in enumerate(rows):
        ax.hlines(r["copy_GBps"], i - width / 2, i + 0.8 - width / 2, colors="k",
                  linestyles="dashed", label="copy" if i == 0 else None)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([f"{r['rule']}\n{r['n'] / 1e6:g}M" for r in rows])
    ax.set_ylabel("effective GB/s (higher is better)")
    ax.set_title(f"one optimizer step, {report['device']} ({report['threads']} threads)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = ARGS or _parse()
    report = bench(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    _plot(report, out.with_suffix(".png"))
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

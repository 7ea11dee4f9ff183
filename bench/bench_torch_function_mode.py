"""What stage 3's TorchFunctionMode costs during forward, per torch call and per forward.

The mode (stage3/engine.py: `ExternalParamMode`) catches a released stage-3 parameter used
outside its owner's forward. It is active for the whole forward of a stage-3 model, so every
torch function called in forward pays one Python call. This measures that cost in one process:
(1) a loop of small torch ops with and without the mode (its per-op overhead), and (2) the
demo GPT's forward at stage 3 on one rank, counting the torch calls the mode sees, against the
same forward of the plain model (what the mode and the hooks cost together).

    python bench/bench_torch_function_mode.py [--ops 20000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.overrides import TorchFunctionMode

import zeroshard
from zeroshard.demo.tiny_gpt import GPTConfig, TinyGPT
from zeroshard.stage3.engine import ExternalParamMode


class _Count(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)

    cfg = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    model, opt = zeroshard.initialize(TinyGPT(GPTConfig()), cfg)
    engine = opt.sharding.engine
    x = torch.randint(0, GPTConfig().vocab_size, (4, 64))
    a, b = torch.randn(8), torch.randn(8)

    def ops() -> None:
        for _ in range(args.ops):
            torch.add(a, b)

    def ops_in_mode() -> None:
        with ExternalParamMode(engine):
            ops()

    plain_ms = _median_ms(ops, args.repeats)
    mode_ms = _median_ms(ops_in_mode, args.repeats)
    per_op_us = 1000 * (mode_ms - plain_ms) / args.ops

    counter = _Count()
    with torch.no_grad(), counter:
        model(x)
    ref = TinyGPT(GPTConfig())
    with torch.no_grad():
        fwd_ms = _median_ms(lambda: model(x), args.repeats)
        ref_ms = _median_ms(lambda: ref(x), args.repeats)

    print(f"torch.add x{args.ops}: {plain_ms:.1f} ms plain, {mode_ms:.1f} ms in the mode: "
          f"{per_op_us:.2f} us per torch call")
    print(f"demo GPT forward (batch 4 x 64, no_grad, 1 rank): {counter.calls} torch calls "
          f"-> about {counter.calls * per_op_us / 1000:.2f} ms of mode overhead per forward")
    print(f"stage-3 forward {fwd_ms:.2f} ms vs plain model {ref_ms:.2f} ms "
          f"(x{fwd_ms / ref_ms:.2f}: mode + hooks + gathers on 1 rank)")


if __name__ == "__main__":
    main()

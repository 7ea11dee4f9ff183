"""Training-step stall of a checkpoint save: synchronous vs `async_save=True`.

One process, the bench GPT (TinyGPT, 4.24M params, AdamW, stage 1), batch 4 x 128. Each
round trains `--steps` steps and saves once in the middle, alternately sync and async; the
stall is the time the training loop is blocked in the `save_checkpoint` call (the part a
step cannot overlap), and also, noisier, the save step's time minus the median plain step
plus (async) the extra time of the steps that ran while the background write was in flight.

    PYTHONPATH=$PWD python bench/bench_ckpt_stall.py --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import zeroshard
from zeroshard.checkpoint import async_save as background
from zeroshard.demo.tiny_gpt import BigramLanguage, GPTConfig, TinyGPT


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab_size=4096, n_embd=256, n_layer=4, n_head=4, block_size=128))
    opt = zeroshard.ZeroOptimizer(model.parameters(), "adamw", stage=1, lr=3e-4)
    data = BigramLanguage(4096)
    n_params = sum(p.numel() for p in model.parameters())
    root = tempfile.mkdtemp()
    it = 0

    def step() -> None:
        nonlocal it
        x, y = data.batch(4, 128, seed=it)
        opt.backward(model(x, y))
        opt.step()
        opt.zero_grad()
        it += 1

    for _ in range(3):
        step()
    stalls: dict[str, list[float]] = {"sync": [], "async": []}
    calls: dict[str, list[float]] = {"sync": [], "async": []}
    for r in range(2 * args.rounds):
        mode = "sync" if r % 2 == 0 else "async"
        times, save_at, in_flight = [], args.steps // 3, []
        for k in range(args.steps):
            t = time.perf_counter()
            step()
            if k == save_at:
                c = time.perf_counter()
                zeroshard.save_checkpoint(root, model, opt, tag=f"r{r}",
                                          async_save=mode == "async")  # fmt: skip
                calls[mode].append(time.perf_counter() - c)
            times.append(time.perf_counter() - t)
            in_flight.append(background.pending())
        background.wait()
        plain = statistics.median(t for k, t in enumerate(times)
                                  if k != save_at and not in_flight[k])  # fmt: skip
        extra = times[save_at] - plain
        extra += sum(t - plain for k, t in enumerate(times) if k > save_at and in_flight[k])
        stalls[mode].append(extra)
        print(f"round {r} {mode:5s}: save call {calls[mode][-1] * 1e3:6.1f} ms, plain step "
              f"{plain * 1e3:6.1f} ms, save step "
              f"{times[save_at] * 1e3:7.1f} ms, total stall {extra * 1e3:7.1f} ms")  # fmt: skip
    s, a = statistics.median(stalls["sync"]), statistics.median(stalls["async"])
    cs, ca = statistics.median(calls["sync"]), statistics.median(calls["async"])
    print(f"{n_params / 1e6:.2f}M params; median blocking save call: sync {cs * 1e3:.1f} ms, "
          f"async {ca * 1e3:.1f} ms, ratio async/sync {ca / cs:.2f}; median step-time stall: "
          f"sync {s * 1e3:.1f} ms, async {a * 1e3:.1f} ms")


if __name__ == "__main__":
    main()

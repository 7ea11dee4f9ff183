"""The training step with `offload_optimizer: {"device": "cpu"}` against no offload, on CPU.

Per stage (1, 2, 3) it trains the demo TinyGPT three ways on 2 spawned gloo ranks (1 thread
each), in `--rounds` interleaved rounds so machine drift hits all alike:

- `plain`: no offload;
- `offload`: `HostOffload` as the config builds it: each reduced bucket's gradients are
  copied to the host as its reduction lands, during backward;
- `offload-at-step`: `HostOffload(overlap_grads=False)`: every gradient copied in `step()`.

It reports the median ms per training step (the slowest rank's forward + backward + step),
split into forward+backward and step, the ratios to `plain` measured in the same run, how
many gradient copies were made inside backward and inside step(), and checks that the three
runs' losses are equal bit for bit. On CPU the "host" is the same memory as the "device", so
the copies cost memory bandwidth on the same cores whichever phase they run in: this measures
what offload costs here, not the overlap (that needs a GPU: `make gpu-check`). Copies in
backward count landed ranges (a bucket's chunk that lands inside a piece), copies in step
count whole pieces.

    python bench/bench_offload.py --quick          # a small model: about 2 minutes on 2 cores
    python bench/bench_offload.py --stages 2 --rounds 5

Writes <out>.json (default bench/results/bench_offload.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch starts OpenMP

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("plain", "offload", "offload-at-step")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", default="1,2,3", help="comma list of stages (1, 2, 3)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--bucket", type=int, default=200_000, help="reduce bucket (elements)")
    ap.add_argument("--quick", action="store_true", help="a smaller model and fewer steps")
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_offload"))
    args = ap.parse_args(argv)
    args.stages = [int(s) for s in args.stages.split(",")]
    if any(s not in (1, 2, 3) for s in args.stages):
        ap.error(f"--stages: offload applies to stages 1, 2 and 3, got {args.stages}")
    if args.quick:  # the model only: --steps and --rounds stay as given
        args.vocab, args.dim, args.seq = 256, 128, 64
        args.bucket = min(args.bucket, 50_000)
    return args


def _config(args: argparse.Namespace, stage: int, offload: bool) -> dict[str, Any]:
    zo: dict[str, Any] = {"stage": stage, "reduce_bucket_size": args.bucket,
                          "allgather_bucket_size": args.bucket, "overlap_comm": True}
    if stage == 3:
        zo["stage3_prefetch_bucket_size"] = args.bucket
        zo["stage3_param_persistence_threshold"] = 0
    if offload:
        zo["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "zero_optimization": zo,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
    }


def run(args: argparse.Namespace, stage: int, variant: str, batches: list) -> dict[str, Any]:
    """One variant's run on this rank: per-step ms (fwd+bwd, step), losses, copy counts."""
    import zeroshard
    from zeroshard.demo.tiny_gpt import GPTConfig, TinyGPT
    from zeroshard.shard.offload import HostOffload

    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab_size=args.vocab, n_embd=args.dim, n_layer=args.layers,
                              n_head=4, block_size=args.seq))  # fmt: skip
    kw = {"placement": HostOffload(overlap_grads=False)} if variant == "offload-at-step" else {}
    model, opt = zeroshard.initialize(model, _config(args, stage, variant == "offload"), **kw)
    place = opt.placement
    off = isinstance(place, HostOffload)
    fb_ms, step_ms, losses = [], [], []
    landed = at_step = 0
    for i, (x, y) in enumerate(batches):
        t0 = time.perf_counter()
        c0 = place.copies_landed if off else 0
        loss = model(x, y)
        opt.backward(loss)
        t1 = time.perf_counter()
        c1, s0 = (place.copies_landed, place.copies_in) if off else (0, 0)
        opt.step()
        opt.zero_grad()
        t2 = time.perf_counter()
        losses.append(loss.item())
        if i >= args.warmup:
            fb_ms.append((t1 - t0) * 1e3)
            step_ms.append((t2 - t1) * 1e3)
            if off:
                landed += c1 - c0
                at_step += place.copies_in - s0
    # the step's time is the slowest rank's whole step
    t = torch.tensor([a + b for a, b in zip(fb_ms, step_ms)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    mem = opt.memory_report()
    return {"total_ms": t.tolist(), "fb_ms": fb_ms, "step_ms": step_ms, "losses": losses,
            "copies_in_backward": landed, "copies_in_step": at_step,
            "device_bytes": mem["device"], "host_bytes": mem["host"]}  # fmt: skip


def _worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=args.timeout))  # fmt: skip
    from zeroshard.demo.tiny_gpt import BigramLanguage

    lang = BigramLanguage(args.vocab, seed=0)
    batches = [lang.batch(args.micro_batch, args.seq, (i * world + rank) * 7919)
               for i in range(args.warmup + args.steps)]  # fmt: skip
    results: dict[str, list[dict[str, Any]]] = {}
    for r in range(args.rounds):
        for stage in args.stages:
            for v in VARIANTS:
                res = run(args, stage, v, batches)
                results.setdefault(f"{stage}/{v}", []).append(res)
                if rank == 0:
                    print(f"[round {r + 1}/{args.rounds}] stage {stage} {v:16s} "
                          f"{statistics.median(res['total_ms']):7.1f} ms/step", flush=True)
    if rank == 0:
        report(args, results)
    dist.barrier()
    dist.destroy_process_group()


def summarize(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]]
              ) -> dict[str, Any]:  # fmt: skip
    rows: dict[str, Any] = {}
    for stage in args.stages:
        row: dict[str, Any] = {}
        for v in VARIANTS:
            runs = results[f"{stage}/{v}"]
            row[v] = {
                "ms_per_step": round(statistics.median(t for r in runs for t in r["total_ms"]), 2),
                "fb_ms": round(statistics.median(t for r in runs for t in r["fb_ms"]), 2),
                "step_ms": round(statistics.median(t for r in runs for t in r["step_ms"]), 2),
                "copies_in_backward": runs[-1]["copies_in_backward"],
                "copies_in_step": runs[-1]["copies_in_step"],
                "device_bytes": runs[-1]["device_bytes"], "host_bytes": runs[-1]["host_bytes"],
            }  # fmt: skip
        base = row["plain"]["ms_per_step"]
        for v in VARIANTS[1:]:
            row[v]["vs_plain"] = round(row[v]["ms_per_step"] / base, 3)
        row["losses_equal"] = all(results[f"{stage}/{v}"][0]["losses"]
                                  == results[f"{stage}/plain"][0]["losses"] for v in VARIANTS)
        rows[str(stage)] = row
    meta = {"torch": torch.__version__, "python": platform.python_version(),
            "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "world": 2, "threads": 1,
            **{k: v for k, v in vars(args).items() if k != "out"}}  # fmt: skip
    return {"meta": meta, "rows": rows}


def report(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]]) -> None:
    summary = summarize(args, results)
    print(f"\n{'stage':>5} {'variant':16s} {'ms/step':>8} {'fwd+bwd':>8} {'step':>7} "
          f"{'vs plain':>8} {'copies bwd/step':>16}")
    for stage, row in summary["rows"].items():
        for v in VARIANTS:
            r = row[v]
            print(f"{stage:>5} {v:16s} {r['ms_per_step']:8.1f} {r['fb_ms']:8.1f} "
                  f"{r['step_ms']:7.1f} {r.get('vs_plain', 1.0):8.3f} "
                  f"{r['copies_in_backward']:>7}/{r['copies_in_step']:<8}")
        print(f"{'':>5} losses equal bit for bit: {row['losses_equal']}")
    out = Path(args.out).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    mp.spawn(_worker, args=(2, _free_port(), args), nprocs=2, join=True)


if __name__ == "__main__":
    main()

"""Stage 3 against DDP, FSDP2 and DeepSpeed ZeRO-3 on a compute-bound and a latency-bound GPT.

One run trains both models under every system with `bench_train.py`'s harness (same data,
AdamW, 2 gloo ranks x 1 thread, interleaved rounds) and reports per model: ms/step, its
ratio to DDP, FSDP2 and DeepSpeed ZeRO-3 (the median over rounds of the per-round ratio, so
machine drift cancels), and collectives per step (counted at the dispatcher in one extra
step, the same way for every system). It checks the targets of the stage-3 work:

- compute-bound GPT (4 layers, d 256, seq 128, micro-batch 4): stage 2 <= 1.05x DDP (plain,
  and with `overlap_param_gather`);
  stage 3 <= 1.2x DDP, <= 0.9x FSDP2, <= 0.85x DeepSpeed ZeRO-3;
- latency-bound GPT (16 layers, d 64, seq 16, micro-batch 2): stage 3 <= 2.0x DDP and
  <= 0.8x FSDP2;
- stage 3's collectives per step no more than FSDP2's on both.

    python bench/bench_stage3.py                  # ~6 min on 2 quiet cores
    python bench/bench_stage3.py --rounds 2 --steps 10

Writes <out>/bench_stage3.json and <out>/bench_stage3.png (and each model's bench_train
files under <out>/<model>/). Timings on a shared machine are noisy: the load average at the
start and end of each model is recorded; compare ratios, never absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_train  # noqa: E402

MODELS = {
    "compute": ["--layers", "4", "--dim", "256", "--seq", "128", "--micro-batch", "4"],
    "latency": ["--layers", "16", "--dim", "64", "--seq", "16", "--micro-batch", "2"],
}
# zs-2-opg: stage 2 with overlap_param_gather (the post-step all-gather behind the forward)
SYSTEMS = "ddp,fsdp2,ds-zero3,zs-2,zs-2-opg,zs-3"
# (model, system, against, most): ms/step of `system` at most `most` x that of `against`
TARGETS = [
    ("compute", "zs-2", "ddp", 1.05), ("compute", "zs-2-opg", "ddp", 1.05),
    ("compute", "zs-3", "ddp", 1.2),
    ("compute", "zs-3", "fsdp2", 0.9), ("compute", "zs-3", "ds-zero3", 0.85),
    ("latency", "zs-3", "ddp", 2.0), ("latency", "zs-3", "fsdp2", 0.8),
]  # fmt: skip


def paired(rows: dict[str, Any], a: str, b: str) -> float | None:
    """Median over rounds of a's round median over b's (drift between rounds cancels)."""
    ra, rb = rows.get(a, {}).get("round_medians_ms"), rows.get(b, {}).get("round_medians_ms")
    if not ra or not rb or len(ra) != len(rb):
        return None
    return statistics.median(x / y for x, y in zip(ra, rb))


def check(results: dict[str, dict]) -> list[dict[str, Any]]:
    out = []
    for model, system, against, most in TARGETS:
        if model not in results:
            continue
        ratio = paired(results[model]["rows"], system, against)
        out.append({"model": model, "system": system, "against": against, "target": most,
                    "ratio": ratio, "ok": ratio is not None and ratio <= most})  # fmt: skip
    for model in results:
        rows = results[model]["rows"]
        ours = rows.get("zs-3", {}).get("collectives_per_step")
        theirs = rows.get("fsdp2", {}).get("collectives_per_step")
        out.append({"model": model, "system": "zs-3", "against": "fsdp2",
                    "target": "collectives <=", "ratio": None if theirs is None else ours,
                    "theirs": theirs, "ok": ours is not None and theirs is not None
                    and ours <= theirs})  # fmt: skip
    return out


def chart(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 * len(results), figsize=(6 * len(results) + 4, 4.8))
    colors = {"ddp": "#777777", "fsdp2": "#2ca02c", "deepspeed": "#1f77b4",
              "zeroshard": "#d62728"}  # fmt: skip
    for k, (model, res) in enumerate(results.items()):
        rows = {n: r for n, r in res["rows"].items() if "skipped" not in r}
        names = list(rows)
        ratio = [paired(rows, n, "ddp") or 0.0 for n in names]
        coll = [rows[n].get("collectives_per_step", 0) for n in names]
        cs = [colors.get(rows[n]["family"], "#999999") for n in names]
        ax = axes[2 * k]
        ax.bar(names, ratio, color=cs)
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set_title(f"{model}-bound: ms/step / DDP (load {res['load'][0]:.1f})")
        for i, v in enumerate(ratio):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
        ax2 = axes[2 * k + 1]
        ax2.bar(names, coll, color=cs)
        ax2.set_title(f"{model}-bound: collectives / step")
        for i, v in enumerate(coll):
            ax2.text(i, v, str(v), ha="center", va="bottom", fontsize=8)
        for a in (ax, ax2):
            a.tick_params(axis="x", rotation=45)
    fig.suptitle("2 gloo ranks x 1 thread, fp32 AdamW; ratios: median over rounds of "
                 "per-round ratios")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--systems", default=SYSTEMS)
    ap.add_argument("--models", default="compute,latency")
    ap.add_argument("--interleave", action="store_true",
                    help="alternate the systems step by step (ratios: per-step pairs)")
    ap.add_argument("--out", default=str(bench_train.ROOT / "bench" / "results" / "stage3"))
    a = ap.parse_args(argv)
    out = Path(a.out)
    results: dict[str, dict] = {}
    for model in a.models.split(","):
        args = bench_train.parse([*MODELS[model], "--systems", a.systems, "--steps",
                                  str(a.steps), "--warmup", str(a.warmup), "--rounds",
                                  str(a.rounds), "--out", str(out / model)]
                                 + (["--interleave"] if a.interleave else []))  # fmt: skip
        before = os.getloadavg()[0]
        bench_train.spawn(args)
        res = json.loads((out / model / "bench_train.json").read_text())
        res["load"] = [before, os.getloadavg()[0]]
        results[model] = res
    checks = check(results)
    print("\nstage-3 targets (ratios: median over rounds of per-round ratios)")
    for c in checks:
        if isinstance(c["target"], float):
            r = "n/a" if c["ratio"] is None else f"{c['ratio']:.2f}"
            print(f"  {c['model']:8s} {c['system']} / {c['against']:8s} = {r:>5s} "
                  f"(target <= {c['target']}) {'OK' if c['ok'] else 'MISSED'}")  # fmt: skip
        else:
            print(f"  {c['model']:8s} zs-3 collectives/step {c['ratio']} vs FSDP2 "
                  f"{c['theirs']} {'OK' if c['ok'] else 'MISSED'}")  # fmt: skip
    for model, res in results.items():
        print(f"  {model}: load average {res['load'][0]:.1f} at start, {res['load'][1]:.1f} "
              "at end")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_stage3.json").write_text(json.dumps({"checks": checks, **{
        m: {"load": r["load"], "meta": r["meta"], "rows": {
            n: {k: v for k, v in row.items() if k not in ("losses",)}
            for n, row in r["rows"].items()}} for m, r in results.items()}}, indent=1))
    chart(results, out / "bench_stage3.png")
    print(f"wrote {out / 'bench_stage3.json'} and {out / 'bench_stage3.png'}")


if __name__ == "__main__":
    main()

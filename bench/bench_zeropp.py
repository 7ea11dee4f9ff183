"""ZeRO++ (qwZ, qgZ, hpZ) on 4 gloo ranks seen as 2 nodes x 2, against plain stage 3 and
DeepSpeed ZeRO-3 with the same keys, in one run.

Uses `bench_train.py`'s harness (same GPT, data, AdamW, interleaved rounds, collectives
counted at the dispatcher in one extra step) with `LOCAL_WORLD_SIZE=2`, and reports per
system:
- ms/step, and its ratio to zeroshard stage 3 and to DeepSpeed ZeRO-3 (median over rounds
  of the per-round ratio, so machine drift cancels);
- bytes sent per step by rank 0, total and inter-node: zeroshard's `comm_report()` (the
  ring formulas of what its algorithm sends), and for every system the same formulas
  applied to the c10d calls seen at the dispatcher (`c10d_*`; the only way to count
  DeepSpeed; on gloo zeroshard's stage-3 reduce-scatter is an in-place all-reduce, which
  the dispatcher counts as one);
- the mean loss of the last steps against plain stage 3's, and bytes held on rank 0 (hpZ's
  secondary shards included in `params` and shown apart).
DeepSpeed's ZeRO++ rows that refuse to run on CPU are kept as rows with DeepSpeed's own error
text (and where it failed: building the engine, or inside a step).

Every stage-3 system runs with `stage3_max_reuse_distance` 0: each unit is released after
use and gathered again in backward, as on a model too large to keep gathered (on this small
GPT a large distance keeps most of it gathered from forward to backward, which leaves hpZ
nothing to save).

    python bench/bench_zeropp.py                        # ~2-3 min on 2 shared cores
    python bench/bench_zeropp.py --rounds 1 --steps 2 --warmup 1 --systems zs-3,zs-3-zeropp

Writes <out>/bench_zeropp.json and <out>/bench_zeropp.png (and the harness's bench_train
files). Timings on a shared machine are noisy: the load average at the start and end is
recorded; compare ratios, never absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_train  # noqa: E402
from bench_stage3 import paired  # noqa: E402

MODEL = ["--layers", "4", "--dim", "128", "--heads", "4", "--seq", "64", "--vocab", "2048",
         "--micro-batch", "4", "--bucket", "200000", "--max-reuse-distance", "0"]  # fmt: skip
RANKS, LOCAL = 4, 2
# DeepSpeed's ZeRO++ rows last: those that fail do so once, after the others' first round
SYSTEMS = ("zs-3,zs-3-qwz,zs-3-qgz,zs-3-hpz,zs-3-zeropp,ds-zero3,ds-3-hpz,ds-3-qgz,"
           "ds-3-qwz,ds-3-zeropp")  # fmt: skip
PLAIN = {"zeroshard": "zs-3", "deepspeed": "ds-zero3"}
LAST = 4  # steps whose mean loss is compared
MiB = 2**20


def sent(row: dict[str, Any]) -> dict[str, int | None]:
    """Bytes rank 0 sent in the counted step: zeroshard's report and the dispatcher's count."""
    rep = row["info"].get("comm_bytes_last_step") or {}
    c10d = row.get("c10d_bytes") or {}
    return {"total": rep.get("total"), "inter_node": rep.get("inter_node"),
            "intra_node": rep.get("intra_node"), "c10d_total": c10d.get("total"),
            "c10d_inter_node": c10d.get("inter_node"),
            "c10d_intra_node": c10d.get("intra_node")}  # fmt: skip


def wire(row: dict[str, Any]) -> tuple[int, int]:
    """(total, inter-node) bytes per step as compared across systems: zeroshard's report,
    DeepSpeed's dispatcher count (both the ring formulas of the collectives sent)."""
    b = row["sent"]
    if b["total"] is not None:
        return b["total"], b["inter_node"]
    return b["c10d_total"], b["c10d_inter_node"]


def rows_of(bench: dict[str, Any]) -> dict[str, dict[str, Any]]:
    rows = bench["rows"]
    out: dict[str, dict[str, Any]] = {}
    base_loss = statistics.mean(rows["zs-3"]["losses"][-LAST:]) if "zs-3" in rows else None
    for name, r in rows.items():
        if "skipped" in r:
            out[name] = {"family": bench_train.SYSTEMS[name][0], "skipped": r["skipped"],
                         "keys": bench_train.zeropp_keys(name)}  # fmt: skip
            continue
        loss = statistics.mean(r["losses"][-LAST:])
        row = {
            "family": r["family"], "keys": bench_train.zeropp_keys(name),
            "ms_per_step": r["ms_per_step"], "p10_ms": r["p10_ms"], "p90_ms": r["p90_ms"],
            "round_medians_ms": r["round_medians_ms"],
            "vs_zs3": paired(rows, name, "zs-3"), "vs_ds_zero3": paired(rows, name, "ds-zero3"),
            "collectives_per_step": r["collectives_per_step"], "collectives": r["collectives"],
            "sent": sent(r), "last_loss": loss,
            "last_loss_vs_zs3": None if base_loss is None else loss / base_loss - 1,
            "losses": r["losses"], "held": r["bytes"],
            "hpz_secondary": r["info"].get("hpz_secondary_bytes", 0),
        }  # fmt: skip
        if "zs-3" in rows:
            row["losses_equal_zs3"] = r["losses"] == rows["zs-3"]["losses"]
        out[name] = row
    for row in out.values():  # bytes against the same family's plain ZeRO-3
        plain = out.get(PLAIN[row["family"]], {})
        if "skipped" in row or "sent" not in plain:
            continue
        (tot, inter), (ptot, pinter) = wire(row), wire(plain)
        row["total_vs_plain"] = tot / ptot if ptot else None
        row["inter_vs_plain"] = inter / pinter if pinter else None
    return out


def checks(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's acceptance figures that one bench run can show."""
    out: list[dict[str, Any]] = []
    zpp, hpz = rows.get("zs-3-zeropp", {}), rows.get("zs-3-hpz", {})
    if "inter_vs_plain" in zpp:
        out.append({"check": "zs-3-zeropp inter-node bytes / zs-3's <= 0.3",
                    "value": zpp["inter_vs_plain"], "ok": zpp["inter_vs_plain"] <= 0.3})
        out.append({"check": "zs-3-zeropp total bytes / zs-3's <= 0.5",
                    "value": zpp["total_vs_plain"], "ok": zpp["total_vs_plain"] <= 0.5})
    if "losses_equal_zs3" in hpz:
        out.append({"check": "zs-3-hpz losses equal zs-3's bit for bit",
                    "value": hpz["losses_equal_zs3"], "ok": hpz["losses_equal_zs3"]})
    for name in ("zs-3-qwz", "zs-3-qgz", "zs-3-zeropp"):
        rel = rows.get(name, {}).get("last_loss_vs_zs3")
        if rel is not None:
            out.append({"check": f"{name} last-{LAST}-steps loss within 1% of zs-3's",
                        "value": rel, "ok": abs(rel) <= 0.01})  # fmt: skip
    return out  # fmt: skip


def _r(x: float | None) -> str:
    return "    -" if x is None else f"{x:5.2f}"


def table(rows: dict[str, dict[str, Any]]) -> str:
    head = (f"{'system':12s} {'ms/step':>8s} {'/zs-3':>5s} {'/ds-3':>5s} {'coll':>4s} | "
            f"{'sent':>6s} {'inter':>6s} {'/plain':>6s} {'c10d':>6s} {'c10dX':>6s} KiB | "
            f"{'held':>5s} {'hpZ':>5s} MiB | last-{LAST} loss  vs zs-3")  # fmt: skip
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        if "skipped" in r:
            lines.append(f"{name:12s} refused: {r['skipped']}")
            continue
        s = r["sent"]
        kib = [None if v is None else v / 1024 for v in
               (s["total"], s["inter_node"], None, s["c10d_total"], s["c10d_inter_node"])]
        cells = ["     -" if v is None else f"{v:6.0f}" for v in kib]
        cells[2] = f"{r.get('inter_vs_plain') or 0:6.2f}"
        lines.append(
            f"{name:12s} {r['ms_per_step']:8.1f} {_r(r['vs_zs3'])} {_r(r['vs_ds_zero3'])} "
            f"{r['collectives_per_step']:4d} | {' '.join(cells)} | "
            f"{r['held']['total'] / MiB:5.2f} {r['hpz_secondary'] / MiB:5.2f} | "
            f"{r['last_loss']:.5f} {r['last_loss_vs_zs3']:+.3%}"
        )
    lines.append(
        "ms/step: median over timed steps and rounds (slowest rank); /zs-3, /ds-3: median "
        "over rounds of the per-round ratio to zeroshard stage 3 / DeepSpeed ZeRO-3; coll: "
        "c10d collectives per step.\nsent/inter: zeroshard's comm_report (rank 0, one step); "
        "/plain: inter-node bytes over the same family's plain ZeRO-3 (DeepSpeed: from c10d); "
        "c10d/c10dX: the same ring formulas over the c10d calls seen at the dispatcher, total "
        "and inter-node.\nheld: rank-0 model-state bytes after the last backward (hpZ: the "
        "secondary shards within it)."
    )
    return "\n".join(lines)


def chart(rows: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {n: r for n, r in rows.items() if "skipped" not in r}
    names = list(ok)
    colors = ["#1f77b4" if ok[n]["family"] == "deepspeed" else "#d62728" for n in names]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0][0]
    ratio = [ok[n]["vs_zs3"] or 0.0 for n in names]
    ax.bar(names, ratio, color=colors)
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_title("ms/step / zeroshard stage 3 (median of per-round ratios)")
    for i, v in enumerate(ratio):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax = axes[0][1]
    inter = [wire(ok[n])[1] / MiB for n in names]
    intra = [(wire(ok[n])[0] - wire(ok[n])[1]) / MiB for n in names]
    ax.bar(names, inter, color="#ff7f0e", label="inter-node")
    ax.bar(names, intra, bottom=inter, color="#2ca02c", label="intra-node")
    ax.set_ylabel("MiB sent per step by rank 0")
    ax.set_title("bytes per step (zeroshard: comm_report; DeepSpeed: c10d calls)")
    ax.legend()
    ax = axes[1][0]
    held = [ok[n]["held"]["total"] / MiB for n in names]
    sec = [ok[n]["hpz_secondary"] / MiB for n in names]
    ax.bar(names, [h - s for h, s in zip(held, sec)], color=colors, label="model states")
    ax.bar(names, sec, bottom=[h - s for h, s in zip(held, sec)], color="#9467bd",
           label="hpZ secondary shards")  # fmt: skip
    ax.set_ylabel("MiB held on rank 0")
    ax.set_title("memory held after the last backward")
    ax.legend()
    ax = axes[1][1]
    base = ok["zs-3"]["losses"] if "zs-3" in ok else None
    for n in names if base else []:
        rel = [100 * (a / b - 1) for a, b in zip(ok[n]["losses"], base)]
        ax.plot(rel, label=n, lw=1.2, ls="--" if ok[n]["family"] == "deepspeed" else "-")
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set_xlabel("step (last round)")
    ax.set_ylabel("% (mean loss over ranks)")
    ax.set_title("loss relative to zeroshard stage 3's")
    ax.legend(fontsize=7)
    for a in axes[0].tolist() + [axes[1][0]]:
        a.tick_params(axis="x", rotation=45)
    refused = [n for n, r in rows.items() if "skipped" in r]
    fig.suptitle(title + (f"\nrefused on CPU: {', '.join(refused)}" if refused else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per system and round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--systems", default=SYSTEMS)
    ap.add_argument("--model-args", default="",
                    help='bench_train options replacing the model\'s, e.g. "--dim 64 --seq 32"')
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--out", default=str(bench_train.ROOT / "bench" / "results" / "zeropp"))
    a = ap.parse_args(argv)
    out = Path(a.out)
    args = bench_train.parse([*MODEL, *shlex.split(a.model_args), "--ranks", str(RANKS),
                              "--local-world-size", str(LOCAL), "--systems", a.systems,
                              "--steps", str(a.steps), "--warmup", str(a.warmup), "--rounds",
                              str(a.rounds), "--timeout", str(a.timeout),
                              "--out", str(out)])  # fmt: skip
    load = [os.getloadavg()[0]]
    bench_train.spawn(args)
    load.append(os.getloadavg()[0])
    bench = json.loads((out / "bench_train.json").read_text())
    rows = rows_of(bench)
    result = {"meta": {**bench["meta"], "load": load, "last_steps": LAST}, "rows": rows,
              "checks": checks(rows),
              "fp32_loss_agreement": bench["fp32_loss_agreement"]}  # fmt: skip
    print(f"\nZeRO++: {bench['meta']['model']}, {RANKS} gloo ranks as {RANKS // LOCAL} nodes x "
          f"{LOCAL}, {a.steps} timed steps x {a.rounds} rounds after {a.warmup} warmup; load "
          f"average {load[0]:.1f} at start, {load[1]:.1f} at end\n{table(rows)}")  # fmt: skip
    for c in result["checks"]:
        v = c["value"]
        shown = str(v) if isinstance(v, bool) else f"{v:.3f}" if "bytes" in c["check"] \
            else f"{v:+.3%}"
        print(f"  {c['check']}: {shown} {'OK' if c['ok'] else 'MISSED'}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_zeropp.json").write_text(json.dumps(result, indent=1))
    chart(rows, out / "bench_zeropp.png",
          f"{bench['meta']['model']} | {RANKS} gloo ranks as {RANKS // LOCAL} nodes x {LOCAL} | "
          f"load {load[0]:.1f}-{load[1]:.1f}")  # fmt: skip
    print(f"wrote {out / 'bench_zeropp.json'} and {out / 'bench_zeropp.png'}")


if __name__ == "__main__":
    main()

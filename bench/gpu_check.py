"""`make gpu-check`: what one CUDA GPU can tell us about zeroshard, in one command.

1. the Triton kernel tests on the GPU (tests/test_kernels_gpu.py, interpreter off);
2. update-step bandwidth of fp32 AdamW, bf16 AdamW (bf16 grads and model copy, fp32 master)
   and AdamW8bit at 2^24 to 2^28 elements: GB/s (bytes the step must move / median time) and
   % of the device's peak HBM bandwidth (from its memory clock and bus width);
3. stages 0-3 on one GPU against torch.optim.AdamW (same model, data and steps);
4. the training step with `offload_optimizer` (stages 1-2) and both offloads (stage 3)
   against the same stage without offload, and against offload with every gradient copied
   at step time (`overlap_grads=False`): what copying each bucket as it lands in backward
   buys;
5. nccl: the process-group start for a CUDA model under torchrun (device from LOCAL_RANK,
   nccl started by `zeroshard.initialize`), stages 0-3 for a few steps against torch.optim,
   on a world of 1 GPU and, with more GPUs, of up to 4 (bench/gpu_nccl.py).

It writes `<out>.json` and `<out>.png` (default bench/results/gpu_check.*) and prints a
verdict per target. Exit status 1 when a correctness check fails (kernel tests, parity,
nccl); performance targets are reported, not enforced. Without CUDA it says so and exits 0.

    python bench/gpu_check.py [--out bench/results/gpu_check] [--quick] [--only offload,nccl]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # a run compiles for the GPU: set before triton is imported
    os.environ["TRITON_INTERPRET"] = "0"  # (importing this module, as its tests do, leaves it)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHIM = ROOT / ".shim"  # a worktree's link to kernels/ as zeroshard_kernels, when present

ADAM_HP = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "amsgrad": False,
           "maximize": False}  # fmt: skip
BLOCK_8BIT = 256
TARGET_FRACTION = 0.80  # the update must reach 80% of HBM peak at 2^26 elements and up
TARGET_OFFLOAD = 1.25  # the offloaded step within 1.25x of no offload
SECTIONS = ("kernels", "bandwidth", "parity", "offload", "nccl")

# Peak HBM bandwidth (bytes/s) by device name, for a torch that does not report the memory
# clock and bus width; vendor data-sheet figures.
KNOWN_PEAKS = {
    "H200": 4.8e12, "H100 SXM": 3.35e12, "H100 PCIe": 2.0e12, "H100": 3.35e12,
    "A100-SXM4-80GB": 2.039e12, "A100": 1.555e12, "L40S": 0.864e12, "L4": 0.3e12,
}  # fmt: skip


# -- pure helpers (tested on CPU: tests/test_gpu_check.py) ----------------------------------
def bytes_per_element(kind: str) -> float:
    """Bytes one update step must move per element.
    fp32 AdamW: read p, g, m, v (16), write p, m, v (12). bf16 AdamW: read p, m, v (12) and a
    bf16 g (2); write p, m, v (12) and the bf16 model copy (2). AdamW8bit (fp32 g): read p, g,
    two code bytes, write p and two code bytes, and two fp32 absmax per block read and written.
    """
    table = {"adamw_fp32": 28.0, "adamw_bf16": 28.0,
             "adamw8bit": 4 + 4 + 2 + 4 + 2 + 16 / BLOCK_8BIT}  # fmt: skip
    return table[kind]


def peak_bandwidth(name: str, memory_clock_khz: int | None, bus_width_bits: int | None) -> float:
    """Peak memory bandwidth in bytes/s: double data rate x clock x bus width when the device
    reports them, else the data-sheet figure for its name; 0.0 when unknown."""
    if memory_clock_khz and bus_width_bits:
        return 2.0 * memory_clock_khz * 1e3 * bus_width_bits / 8
    for key, value in KNOWN_PEAKS.items():
        if key in name:
            return value
    return 0.0


def verdicts(results: dict[str, Any]) -> dict[str, bool | None]:
    """Each target met (True), missed (False) or not measured (None)."""
    out: dict[str, bool | None] = {}
    kt = results.get("kernel_tests")
    out["kernel tests pass on the GPU"] = (
        None if kt is None else kt["failed"] == 0 and kt["passed"] > 0
    )
    bw = [r for r in results.get("bandwidth", [])
          if r["log2_n"] >= 26 and r["kind"] != "adamw8bit"]  # fmt: skip
    fracs = [r["fraction_of_peak"] for r in bw if r["fraction_of_peak"] is not None]
    out[f"update >= {TARGET_FRACTION:.0%} of peak at 2^26+"] = (
        min(fracs) >= TARGET_FRACTION if fracs else None
    )
    par = results.get("parity")
    out["stages 0-3 match torch.optim"] = None if par is None else all(r["ok"] for r in par)
    off = results.get("offload")
    out[f"offloaded step within {TARGET_OFFLOAD}x"] = (
        None if not off else max(r["ratio"] for r in off) <= TARGET_OFFLOAD
    )
    out["offload copies gradients during backward"] = (
        None if not off else all(r.get("copies_in_backward", 0) > 0
                                 and r.get("copies_in_step", 1) == 0 for r in off)
    )  # fmt: skip
    nccl = results.get("nccl")
    out["nccl: stages 0-3 match torch.optim"] = (
        None if not nccl else all(r["ok"] for r in nccl)
    )
    return out


def exit_status(v: dict[str, bool | None]) -> int:
    """1 when a correctness check failed (a check not run is not a failure)."""
    checks = ("kernel tests pass on the GPU", "stages 0-3 match torch.optim",
              "nccl: stages 0-3 match torch.optim")  # fmt: skip
    return 1 if any(v.get(c) is False for c in checks) else 0


def parse_pytest_summary(text: str) -> dict[str, int]:
    """Counts from pytest's last line ("3 passed, 1 failed, 2 skipped in 1.2s")."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    for num, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", text):
        counts["errors" if word.startswith("error") else word] += int(num)
    return counts


# -- the checks -----------------------------------------------------------------------------
def kernel_tests() -> dict[str, Any]:
    env = dict(os.environ, TRITON_INTERPRET="0")
    paths = [str(ROOT)] + ([str(SHIM)] if SHIM.exists() else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_kernels_gpu.py"], cwd=ROOT, env=env,
                          capture_output=True, text=True)  # fmt: skip
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    counts = parse_pytest_summary(tail[-1] if tail else "")
    if proc.returncode != 0:
        counts["failed"] = max(counts["failed"] + counts["errors"], 1)
    return {**counts, "seconds": round(time.perf_counter() - t0, 1), "tail": tail}


def _time_cuda(fn: Any, warmup: int, repeats: int) -> float:
    """Median milliseconds of `fn()` timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _update_fn(kind: str, n: int) -> Any:
    from zeroshard import quant8 as Q
    from zeroshard.update.apply import apply_update, init_state

    dev = "cuda"
    p = torch.randn(n, device=dev)
    if kind == "adamw8bit":
        g = torch.randn(n, device=dev)
        st = list(Q.init_state8(n, BLOCK_8BIT, dev).values())
        return lambda: Q.adamw8bit_step_(p, g, *st, lr=1e-3, step=1, block_size=BLOCK_8BIT,
                                         backend="triton")  # fmt: skip
    g = torch.randn(n, device=dev, dtype=torch.float32 if kind == "adamw_fp32" else torch.bfloat16)
    state = init_state("adamw", ADAM_HP, [p])
    copies = None if kind == "adamw_fp32" else [torch.empty(n, dtype=torch.bfloat16, device=dev)]
    return lambda: apply_update("adamw", [p], [g], state, lr=1e-3, step=1, hp=ADAM_HP,
                                model_copies=copies, backend="triton")  # fmt: skip


def bandwidth(log2_sizes: list[int], peak: float, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for k in log2_sizes:
        n = 1 << k
        for kind in ("adamw_fp32", "adamw_bf16", "adamw8bit"):
            ms = _time_cuda(_update_fn(kind, n), warmup=3, repeats=repeats)
            gbs = bytes_per_element(kind) * n / (ms * 1e-3) / 1e9
            rows.append({"kind": kind, "log2_n": k, "ms": round(ms, 4), "GB/s": round(gbs, 1),
                         "fraction_of_peak": round(gbs * 1e9 / peak, 3) if peak else None})
            torch.cuda.empty_cache()
            print(f"  {kind:11s} 2^{k}: {ms:8.3f} ms  {gbs:8.1f} GB/s"
                  + (f"  {100 * gbs * 1e9 / peak:5.1f}% of peak" if peak else ""))
    return rows


def copy_bandwidth(n: int = 1 << 28) -> float:
    """Device-to-device copy_ GB/s (read + write): the bandwidth a kernel can hope for."""
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    ms = _time_cuda(lambda: dst.copy_(src), warmup=3, repeats=10)
    return 8 * n / (ms * 1e-3) / 1e9


def _gpt(cfg_kw: dict[str, int]) -> Any:
    from zeroshard.demo.tiny_gpt import GPTConfig, TinyGPT

    torch.manual_seed(0)
    return TinyGPT(GPTConfig(**cfg_kw)).cuda()


def _batches(cfg_kw: dict[str, int], batch: int, steps: int) -> list[tuple[Any, Any]]:
    from zeroshard.demo.tiny_gpt import BigramLanguage

    data = BigramLanguage(cfg_kw["vocab_size"])
    return [tuple(t.cuda() for t in data.batch(batch, cfg_kw["block_size"], seed=s))
            for s in range(steps)]  # fmt: skip


def _zs_config(stage: int, **zo: Any) -> dict[str, Any]:
    adamw = {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}}
    return {"zero_optimization": {"stage": stage, **zo}, "optimizer": adamw}


def _losses(model: Any, opt: Any, data: list[tuple[Any, Any]]) -> list[float]:
    """Train on `data` (one step per batch) and return the losses."""
    out = []
    for x, y in data:
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(loss.item())
    return out


def parity(steps: int) -> list[dict[str, Any]]:
    """Stages 0-3 (Triton update on the GPU) vs torch.optim.AdamW, fp32, one GPU."""
    import zeroshard

    cfg_kw = {"vocab_size": 512, "n_embd": 256, "n_layer": 4, "n_head": 4, "block_size": 128}
    data = _batches(cfg_kw, 8, steps)
    ref = _gpt(cfg_kw)
    want = _losses(ref, torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.01), data)
    rows = []
    for stage in range(4):
        model, zopt = zeroshard.initialize(_gpt(cfg_kw), _zs_config(stage))
        got = _losses(model, zopt, data)
        rel = max(abs(a - b) / abs(b) for a, b in zip(got, want))
        rows.append({"stage": stage, "max_rel_loss_diff": rel, "ok": rel <= 1e-4,
                     "final_loss": got[-1], "torch_final_loss": want[-1]})  # fmt: skip
        print(f"  stage {stage}: max relative loss difference {rel:.2e} over {steps} steps")
        del model, zopt
    return rows


def offload(steps: int, quick: bool, batch: int) -> list[dict[str, Any]]:
    """Step time (forward + backward + step, synchronized) without offload, with offload
    (each bucket's gradients copied to pinned host memory as its reduction lands, on a copy
    stream, behind the rest of backward) and with offload copying at step time: the ratio
    depends on how much compute a step has per parameter (the batch)."""
    import zeroshard

    small = {"vocab_size": 4096, "n_embd": 512, "n_layer": 4, "n_head": 8, "block_size": 256}
    large = {"vocab_size": 8192, "n_embd": 1024, "n_layer": 8, "n_head": 16, "block_size": 512}
    cfg_kw = small if quick else large
    data = _batches(cfg_kw, batch, 4)
    cpu_off = {"device": "cpu", "pin_memory": True}
    rows = []
    both = {"offload_optimizer": cpu_off, "offload_param": cpu_off}
    opt_only = {"offload_optimizer": cpu_off}
    for stage, extra in ((1, opt_only), (2, opt_only), (3, both)):
        times: dict[str, Any] = {}
        for name in ("plain", "offload", "offload_at_step"):
            zo = {} if name == "plain" else extra
            cfg = {**_zs_config(stage, **copy.deepcopy(zo)), "bf16": {"enabled": True}}
            model, opt = zeroshard.initialize(_gpt(cfg_kw), cfg)
            place = opt.placement
            if name == "offload_at_step":
                place.overlap_grads = False  # the copies wait for step(), as before

            def one_step(i: int, model: Any = model, opt: Any = opt) -> None:
                x, y = data[i % len(data)]
                model(x, y).backward()
                opt.step()
                opt.zero_grad()

            for i in range(3):
                one_step(i)
            torch.cuda.synchronize()
            landed0, at_step0 = getattr(place, "copies_landed", 0), getattr(place, "copies_in", 0)
            per = []
            for i in range(steps):
                t0 = time.perf_counter()
                one_step(i)
                torch.cuda.synchronize()
                per.append((time.perf_counter() - t0) * 1e3)
            times[name] = statistics.median(per)
            if name == "offload":
                times["copies_in_backward"] = place.copies_landed - landed0
                times["copies_in_step"] = place.copies_in - at_step0
            mem = opt.memory_report()
            times[f"{name}_device_bytes"], times[f"{name}_host_bytes"] = mem["device"], mem["host"]
            del model, opt, place, one_step
            torch.cuda.empty_cache()
        ratio = times["offload"] / times["plain"]
        params = sum(p.numel() for p in _gpt(cfg_kw).parameters())
        rows.append({"stage": stage, "params": params, "batch": batch, "threads":
                     torch.get_num_threads(), "ms_plain": round(times["plain"], 2),
                     "ms_offload": round(times["offload"], 2),
                     "ms_offload_at_step": round(times["offload_at_step"], 2),
                     "ratio": round(ratio, 3),
                     "ratio_at_step": round(times["offload_at_step"] / times["plain"], 3),
                     "copies_in_backward": times["copies_in_backward"],
                     "copies_in_step": times["copies_in_step"],
                     **{k: v for k, v in times.items() if k.endswith("_bytes")}})  # fmt: skip
        print(f"  stage {stage}: {times['plain']:.1f} ms without, {times['offload']:.1f} ms "
              f"with offload ({ratio:.2f}x; {rows[-1]['ratio_at_step']:.2f}x copying at step "
              f"time), {params / 1e6:.0f}M params, {times['copies_in_backward']} gradient "
              f"copies in backward, {times['copies_in_step']} in step()")
    return rows


def nccl(steps: int, out_dir: Path) -> list[dict[str, Any]]:
    """bench/gpu_nccl.py under torchrun on 1 GPU, then on up to 4 when there are more."""
    from gpu_nccl import nccl_worlds, torchrun_cmd

    env = dict(os.environ, TRITON_INTERPRET="0")
    paths = [str(ROOT)] + ([str(SHIM)] if SHIM.exists() else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    rows: list[dict[str, Any]] = []
    for world in nccl_worlds(torch.cuda.device_count()):
        path = out_dir / f"gpu_check_nccl_world{world}.json"
        path.unlink(missing_ok=True)
        proc = subprocess.run(torchrun_cmd(world, path, steps), cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=900)  # fmt: skip
        print("\n".join("  " + ln for ln in proc.stdout.strip().splitlines()))
        if proc.returncode != 0 or not path.exists():
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
            print(f"  world {world}: FAILED (exit {proc.returncode})\n    " + "\n    ".join(tail))
            rows.append({"world": world, "ok": False, "exit": proc.returncode, "tail": tail})
            continue
        got = json.loads(path.read_text())
        rows += [{**r, "started_by": got["started_by"]} for r in got["rows"]]
    return rows


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind in ("adamw_fp32", "adamw_bf16", "adamw8bit"):
        rows = [r for r in results.get("bandwidth", []) if r["kind"] == kind]
        a.plot([r["log2_n"] for r in rows], [r["GB/s"] for r in rows], marker="o", label=kind)
    if results["peak_GBps"]:
        a.axhline(results["peak_GBps"], color="k", ls="--", label="HBM peak")
        a.axhline(TARGET_FRACTION * results["peak_GBps"], color="r", ls=":", label="80% target")
    a.set_xlabel("log2(elements)")
    a.set_ylabel("GB/s")
    a.set_title(f"update-step bandwidth, {results['device']}")
    a.legend()
    off = results.get("offload") or []
    labels = [f"stage {r['stage']}" for r in off]
    x = range(len(off))
    b.bar([i - 0.27 for i in x], [r["ms_plain"] for r in off], 0.27, label="no offload")
    b.bar(list(x), [r["ms_offload"] for r in off], 0.27, label="offload")
    b.bar([i + 0.27 for i in x], [r["ms_offload_at_step"] for r in off], 0.27,
          label="offload, copies at step")
    b.set_xticks(list(x), labels)
    b.set_ylabel("ms / training step")
    b.set_title("offload step time")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_check"))
    ap.add_argument("--quick", action="store_true", help="2^24-2^26 and a smaller offload model")
    ap.add_argument("--offload-batch", type=int, default=32, help="sequences per offload step")
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma list of sections to run, of: {', '.join(SECTIONS)}")
    ap.add_argument("--nccl-steps", type=int, default=3, help="steps per stage in the nccl run")
    args = ap.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in args.only if s not in SECTIONS]
    if bad or not args.only:
        ap.error(f"--only: unknown or no sections {bad}; choose from {', '.join(SECTIONS)}")
    if args.nccl_steps < 1 or args.offload_batch < 1:
        ap.error("--nccl-steps and --offload-batch must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False); nothing "
              f"was run ({', '.join(args.only)} skipped). Run `make gpu-check` on a machine "
              "with an NVIDIA GPU.")  # fmt: skip
        return 0
    props = torch.cuda.get_device_properties(0)
    peak = peak_bandwidth(props.name, getattr(props, "memory_clock_rate", None),
                          getattr(props, "memory_bus_width", None))  # fmt: skip
    results: dict[str, Any] = {"device": props.name, "peak_GBps": round(peak / 1e9, 1),
                               "torch": torch.__version__, "cuda": torch.version.cuda,
                               "gpus": torch.cuda.device_count(), "sections": args.only}
    print(f"gpu-check on {props.name} (peak {peak / 1e9:.0f} GB/s), torch {torch.__version__}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if "kernels" in args.only:
        print("1. kernel tests on the GPU")
        results["kernel_tests"] = kernel_tests()
        print("  " + "\n  ".join(results["kernel_tests"]["tail"][-3:]))
    if "bandwidth" in args.only:
        print("2. update-step bandwidth")
        results["copy_GBps"] = round(copy_bandwidth(), 1)
        print(f"  device copy_: {results['copy_GBps']} GB/s")
        sizes = [24, 25, 26] if args.quick else [24, 25, 26, 27, 28]
        results["bandwidth"] = bandwidth(sizes, peak, repeats=10)
    if "parity" in args.only:
        print("3. stages 0-3 vs torch.optim.AdamW on one GPU")
        results["parity"] = parity(steps=20)
    if "offload" in args.only:
        print("4. offload step time")
        results["offload"] = offload(steps=5 if args.quick else 10, quick=args.quick,
                                     batch=args.offload_batch)
    if "nccl" in args.only:
        print("5. nccl process group under torchrun, stages 0-3 vs torch.optim")
        results["nccl"] = nccl(args.nccl_steps, out.parent)
    results["verdicts"] = verdicts(results)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    plot(results, out.with_suffix(".png"))
    print("verdicts:")
    for what, ok in results["verdicts"].items():
        print(f"  {'met' if ok else 'MISSED' if ok is False else 'not measured':>12}  {what}")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return exit_status(results["verdicts"])


if __name__ == "__main__":
    sys.exit(main())

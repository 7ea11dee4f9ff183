"""`make gpu-check`'s nccl section: the process-group start for a CUDA model, one rank each.

`gpu_check.py` launches this file under torchrun, first as a world of 1 GPU and then, when
the machine has more, as a world of up to 4. Each rank does what a torchrun training script
does: sets its device from LOCAL_RANK, builds a CUDA model, and calls `zeroshard.initialize`,
which (world >= 2) starts the nccl process group from the launcher's environment
(`prepare.start_process_group`); a world of 1 is started here (zeroshard leaves a single
process alone). Then stages 0-3 train a small GPT for a few steps, each rank on its slice of
the global batch, and the mean loss over ranks must match single-process
`torch.optim.AdamW` on the whole batch (relative difference <= 1e-4).

    torchrun --standalone --nproc_per_node 2 bench/gpu_nccl.py OUT.json [--steps 3]

Rank 0 writes OUT.json ({"rows": [...], "started_by": ...}); exit status 1 when a stage
misses. Without CUDA it says so and exits 0; `--cpu-gloo` runs the same on CPU with gloo
(tests/test_gpu_check.py drives it that way).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # a run compiles for the GPU: set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "0")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# small: this checks the process group and the stages, not speed
GPT = {"vocab_size": 128, "n_embd": 32, "n_layer": 2, "n_head": 2, "block_size": 16}
PER_RANK_BATCH = 4
TOLERANCE = 1e-4


def nccl_worlds(device_count: int) -> list[int]:
    """The worlds to launch: 1 GPU, and up to 4 when there are more."""
    return [1] + ([min(device_count, 4)] if device_count >= 2 else [])


def torchrun_cmd(nproc: int, out: Path, steps: int, cpu_gloo: bool = False) -> list[str]:
    """The command that runs this file on `nproc` ranks of one machine."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(Path(__file__).resolve()), str(out),
           "--steps", str(steps)]  # fmt: skip
    return cmd + (["--cpu-gloo"] if cpu_gloo else [])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(device: torch.device) -> torch.nn.Module:
    from zeroshard.demo.tiny_gpt import GPTConfig, TinyGPT

    torch.manual_seed(0)
    return TinyGPT(GPTConfig(**GPT)).to(device)


def _config(stage: int) -> dict[str, Any]:
    return {"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}}}


def check_stages(device: torch.device, steps: int) -> list[dict[str, Any]]:
    """Stages 0-3 on the running process group, each rank on its slice of the global batch,
    against single-process torch.optim.AdamW on the whole batch (every rank computes it)."""
    import torch.distributed as dist

    import zeroshard
    from zeroshard.demo.tiny_gpt import BigramLanguage

    rank, world = dist.get_rank(), dist.get_world_size()
    lang = BigramLanguage(GPT["vocab_size"])
    data = [tuple(t.to(device) for t in lang.batch(PER_RANK_BATCH * world, GPT["block_size"],
                                                   seed=s)) for s in range(steps)]  # fmt: skip
    ref = _model(device)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.01)
    want = []
    for x, y in data:
        loss = ref(x, y)
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        want.append(loss.item())
    del ref, ref_opt
    rows = []
    for stage in range(4):
        model, opt = zeroshard.initialize(_model(device), _config(stage))
        got = []
        for x, y in data:
            lo, hi = rank * PER_RANK_BATCH, (rank + 1) * PER_RANK_BATCH
            loss = model(x[lo:hi], y[lo:hi])
            loss.backward()
            opt.step()
            opt.zero_grad()
            mean = loss.detach().clone()
            dist.all_reduce(mean)  # equal slices: the mean of the ranks' means is the batch's
            got.append(mean.item() / world)
        rel = max(abs(a - b) / abs(b) for a, b in zip(got, want))
        rows.append({"world": world, "stage": stage, "backend": dist.get_backend(),
                     "device": str(device), "max_rel_loss_diff": rel, "ok": rel <= TOLERANCE,
                     "losses": got, "torch_losses": want})  # fmt: skip
        if rank == 0:
            print(f"  world {world} ({dist.get_backend()}), stage {stage}: max relative loss "
                  f"difference {rel:.2e} over {steps} steps", flush=True)
        del model, opt
    return rows


def run(out: str, steps: int, cpu_gloo: bool) -> int:
    """One torchrun rank (see the module docstring); rank 0 writes `out`."""
    import torch.distributed as dist

    import zeroshard

    if not cpu_gloo and not torch.cuda.is_available():
        print("gpu-check nccl: no CUDA device here (torch.cuda.is_available() is False); "
              "skipped")  # fmt: skip
        return 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cpu_gloo:
        device = torch.device("cpu")
    else:
        torch.cuda.set_device(local)  # what a torchrun script does first
        device = torch.device("cuda", local)
    if world == 1:  # zeroshard leaves a single process alone: start its group here
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("gloo" if cpu_gloo else "nccl", rank=0, world_size=1)
        started_by = "gpu_nccl.py"
    else:  # a CUDA model's first initialize starts nccl from torchrun's environment
        zeroshard.initialize(_model(device), _config(0))
        started_by = "zeroshard.initialize"
    rows = check_stages(device, steps)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"rows": rows, "started_by": started_by}, indent=2))
    dist.barrier()
    dist.destroy_process_group()
    return 0 if all(r["ok"] for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="JSON file rank 0 writes")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--cpu-gloo", action="store_true", help="CPU tensors and gloo (tests)")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    return run(args.out, args.steps, args.cpu_gloo)


if __name__ == "__main__":
    sys.exit(main())

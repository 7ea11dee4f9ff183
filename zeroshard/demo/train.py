"""The demo job: train a small GPT on a synthetic language with a zeroshard JSON config.

    torchrun --standalone --nproc_per_node 2 -m zeroshard.train --config configs/zero2.json

Prints a progress bar, a loss line every `steps_per_print` steps, and each rank's bytes held
(params, grads, master, optimizer states) next to what the ZeRO formulas predict.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import zeroshard
from zeroshard.accounting import zero_formula
from zeroshard.demo.tiny_gpt import BigramLanguage, GPTConfig, TinyGPT

# The demo's default config ships with the package source; without the repo checkout the same
# settings are embedded here.
_REPO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "zero2.json"
_EMBEDDED_CONFIG = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10, "warmup_type": "linear"}},
    "gradient_clipping": 1.0,
    "steps_per_print": 10,
    "zero_optimization": {"stage": 2, "reduce_bucket_size": 2_000_000},
}

MiB = 2**20


def _setup_distributed() -> None:
    if "RANK" in os.environ and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=timedelta(seconds=120))


def _memory_line(report: dict[str, int], formula: dict[str, float]) -> str:
    """Held bytes next to the ZeRO formula's, in MiB."""
    keys = ("params", "grads", "master", "optimizer_states")
    held = " ".join(f"{k} {report[k] / MiB:.2f}" for k in keys)
    want = " ".join(f"{formula[k] / MiB:.2f}" for k in keys)
    return f"{held} | total {report['total'] / MiB:.2f} MiB (ZeRO formula: {want})"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(_REPO_CONFIG) if _REPO_CONFIG.exists() else None)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-dir", default=None, help="save a checkpoint here at the end")
    ap.add_argument("--resume", action="store_true", help="load the latest from --save-dir")
    args = ap.parse_args(argv)

    _setup_distributed()
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    config = args.config or _EMBEDDED_CONFIG
    torch.manual_seed(args.seed)
    gpt = GPTConfig(n_layer=args.layers, n_embd=args.dim, block_size=args.seq)
    model = TinyGPT(gpt).to(device)
    # counted before initialize: at stage 3 the parameters are placeholders afterwards
    numel = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model, opt = zeroshard.initialize(model, config)
    cfg = opt.config
    lang = BigramLanguage(gpt.vocab_size, seed=args.seed)
    elem = torch.empty((), dtype=cfg.compute_dtype).element_size()
    rule = cfg.optimizer_spec()[0]
    formula = zero_formula(
        trainable,
        cfg.zero_optimization.stage, world, param_bytes=elem,
        grad_bytes=torch.empty((), dtype=cfg.reduce_dtype).element_size(),
        state_tensors={"adamw": 2, "adam": 2, "lion": 1, "sgd": 1}[rule],
    )  # fmt: skip
    micro, gas = cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps
    if rank == 0:
        src = args.config or "embedded default"
        print(
            f"zeroshard demo: {numel / 1e6:.2f}M params, stage {cfg.zero_optimization.stage}, "
            f"{cfg.precision}, {world} rank(s), global batch {cfg.train_batch_size} "
            f"(micro {micro} x accumulation {gas} x {world}), config {src}\n"
            f"loss starts near ln(vocab) = {torch.log(torch.tensor(256.0)):.2f}; "
            f"the language's entropy (best possible) is {lang.entropy():.2f}",
            flush=True,
        )
    start = 0
    if args.resume and args.save_dir:
        _, client = zeroshard.load_checkpoint(args.save_dir, model, opt)
        start = client.get("step", 0)
        if rank == 0:
            print(f"resumed from {args.save_dir} at step {start}", flush=True)
    steps = range(start, start + args.steps)
    bar = tqdm(steps, disable=rank != 0, desc="train", unit="step", mininterval=1.0)
    t0 = time.perf_counter()
    for step in bar:
        loss_sum = 0.0
        for k in range(gas):
            seed = ((step * gas + k) * world + rank) * 7919 + args.seed
            x, y = (t.to(device) for t in lang.batch(micro, args.seq, seed))
            loss = model(x, y)
            opt.backward(loss)
            loss_sum += loss.item() / gas
        opt.step()
        opt.zero_grad()
        if (step + 1) % cfg.steps_per_print == 0 or step + 1 == args.steps:
            ms = (time.perf_counter() - t0) * 1000 / (step + 1 - start)
            reports = [None] * world
            mem = opt.memory_report()
            if dist.is_initialized():
                dist.all_gather_object(reports, mem)
            else:
                reports = [mem]
            if rank == 0:
                lr = opt.param_groups[0]["lr"]
                norm = getattr(opt, "last_grad_norm", None)
                sent = opt.comm_report()  # rank 0's last step (inter-node: torchrun's nodes)
                lines = [
                    f"step {step + 1:4d} | loss {loss_sum:.4f} | lr {lr:.2e} | grad norm "
                    f"{norm if norm is not None else float('nan'):.3f} | {ms:.0f} ms/step | "
                    f"sent {sent['total'] / MiB:.2f} MiB/step "
                    f"({sent['inter_node'] / MiB:.2f} MiB inter-node)"
                ]
                for r, rep in enumerate(reports):
                    lines.append(f"  rank {r} MiB: {_memory_line(rep, formula)}")
                bar.write("\n".join(lines))
        bar.set_postfix(loss=f"{loss_sum:.3f}")
    if args.save_dir:
        path = zeroshard.save_checkpoint(
            args.save_dir, model, opt, tag=f"step{start + args.steps}",
            client_state={"step": start + args.steps},
        )  # fmt: skip
        if rank == 0:
            print(f"checkpoint saved to {path}", flush=True)
    if rank == 0:
        comm = opt.comm_report()
        print("last step sent (bytes): " + json.dumps(comm), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

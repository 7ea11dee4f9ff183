"""AdamW8bit through zeroshard against fp32 AdamW: 150+ steps on the demo GPT and on an MLP.

    torchrun --standalone --nproc_per_node 2 bench/train_adamw8bit.py --steps 160

Per model, three runs from the same weights and batches: fp32 AdamW at stage 1, AdamW8bit at
stage 1 and AdamW8bit at stage 3 (bf16 master with --bf16). Prints the mean loss of the last
30 steps, the largest relative loss difference between stage 1 and stage 3 step by step, and
each rank's optimizer-state bytes against the formula (2 bytes per element + 8 per block of
every 8-bit parameter, 8 bytes per element of the others, divided by the world size); writes
the figures to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch import nn

import zeroshard
from zeroshard import quant8 as Q
from zeroshard.demo.tiny_gpt import BigramLanguage, GPTConfig, TinyGPT


class MLP(nn.Module):
    """A teacher-student regression: 8-bit matrices of 40960 and 65536 elements (several
    blocks cut across ranks), fp32 biases and a 256-element output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(160, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(),
                                 nn.Linear(256, 1))  # fmt: skip

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dtype = self.net[0].weight.dtype  # bf16 runs: the batch follows the weights
        return nn.functional.mse_loss(self.net(x.to(dtype)).float(), y)


def gpt_data(steps: int, batch: int):
    cfg = GPTConfig(vocab_size=256, n_embd=128, n_layer=4, n_head=4, block_size=64)
    lang = BigramLanguage(cfg.vocab_size, seed=0)
    return (lambda: TinyGPT(cfg)), [lang.batch(batch, cfg.block_size, seed=s)
                                    for s in range(steps)]  # fmt: skip


def mlp_data(steps: int, batch: int):
    g = torch.Generator().manual_seed(3)
    teacher = nn.Sequential(nn.Linear(160, 32), nn.Tanh(), nn.Linear(32, 1))
    for p in teacher.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.3
    out = []
    for _ in range(steps):
        x = torch.randn(batch, 160, generator=g)
        with torch.no_grad():
            out.append((x, teacher(x) + 0.01 * torch.randn(batch, 1, generator=g)))
    return MLP, out


def run(make, batches, optimizer: dict, stage: int, bf16: bool) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = make()
    sizes = [p.numel() for p in model.parameters()]
    cfg = {"train_micro_batch_size_per_gpu": batches[0][0].shape[0] // world,
           "optimizer": optimizer, "zero_optimization": {
               "stage": stage, "stage3_param_persistence_threshold": 0}}  # fmt: skip
    if bf16:
        cfg["bf16"] = {"enabled": True}
    model, opt = zeroshard.initialize(model, cfg)
    losses = []
    for x, y in batches:
        n = x.shape[0] // world
        loss = model(x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n])
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
        t = loss.detach().float().reshape(1)
        dist.all_reduce(t)
        losses.append(t.item() / world)
    held = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(held, torch.tensor([opt.memory_report()["optimizer_states"]]))
    if optimizer["type"] == "AdamW8bit":
        bs = optimizer["params"].get("block_size", 256)
        min8 = optimizer["params"].get("min_8bit_size", 4096)
        formula = sum(Q.state_bytes(n, bs, min8) for n in sizes) / world
    else:
        formula = 8 * sum(sizes) / world
    return {"losses": losses, "state_bytes": [int(h) for h in held], "formula": formula,
            "last30": sum(losses[-30:]) / 30}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--out", default="bench/results/train_adamw8bit.json")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    fp32 = {"type": "AdamW", "params": {"lr": 2e-3, "weight_decay": 0.01}}
    q8 = {"type": "AdamW8bit", "params": {"lr": 2e-3, "weight_decay": 0.01}}
    figures = {}
    for name, data in (("demo_gpt", gpt_data), ("mlp", mlp_data)):
        make, batches = data(args.steps, 16)
        res = {"fp32_s1": run(make, batches, fp32, 1, args.bf16),
               "q8_s1": run(make, batches, q8, 1, args.bf16),
               "q8_s3": run(make, batches, q8, 3, args.bf16)}
        a, b = res["q8_s1"]["losses"], res["q8_s3"]["losses"]
        s13 = max(abs(x - y) / abs(x) for x, y in zip(a, b))
        rel = (res["q8_s1"]["last30"] - res["fp32_s1"]["last30"]) / res["fp32_s1"]["last30"]
        figures[name] = {**res, "stage1_vs_stage3_max_rel": s13, "q8_vs_fp32_last30_rel": rel}
        if dist.get_rank() == 0:
            print(f"{name}: first loss {a[0]:.4f}; last-30 mean loss fp32 "
                  f"{res['fp32_s1']['last30']:.5f}, 8-bit s1 {res['q8_s1']['last30']:.5f} "
                  f"({rel:+.3%}), 8-bit s3 {res['q8_s3']['last30']:.5f}; stage 1 vs 3 max "
                  f"relative loss difference {s13:.2e}", flush=True)
            for k in ("fp32_s1", "q8_s1", "q8_s3"):
                r = res[k]
                dev = [f"{(h - r['formula']) / r['formula']:+.2%}" for h in r["state_bytes"]]
                print(f"  {k}: state bytes per rank {r['state_bytes']} vs formula "
                      f"{r['formula']:.0f} ({', '.join(dev)})", flush=True)
    if dist.get_rank() == 0:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

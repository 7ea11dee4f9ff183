"""Training jobs the checkpoint tests run on gloo ranks (stage 0-3, fp32/bf16)."""

from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.distributed as dist

import zeroshard
from tests.models import batch, loss_fn, make_model, param_groups

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 12  # divisible by 1, 2, 3 and 4 ranks
LR = 3e-3


def rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build(stage: int, precision: str = "fp32", bucket: int = 700, seed: int = 0):
    """The test model and its optimizer at `stage` (3: through zeroshard.initialize)."""
    model = make_model(seed)
    groups = param_groups(model)
    if stage == 3:
        from zeroshard import initialize

        cfg = {
            "zero_optimization": {
                "stage": 3, "allgather_bucket_size": bucket, "reduce_bucket_size": bucket,
                "stage3_prefetch_bucket_size": 2 * bucket,
                "stage3_param_persistence_threshold": 0,
            },
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.1}},
        }  # fmt: skip
        if precision == "bf16":
            cfg["bf16"] = {"enabled": True}
        return initialize(model, cfg, model_parameters=groups)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
        groups = param_groups(model)
    opt = zeroshard.ZeroOptimizer(groups, "adamw", stage=stage, lr=LR, reduce_bucket_size=bucket)
    return model, opt


def train(model, opt, start: int, steps: int) -> list[float]:
    """Steps [start, start+steps) on this rank's slice of the global batch; global losses."""
    rank, world = rank_world()
    n = GLOBAL_BATCH // world
    losses = []
    for step in range(start, start + steps):
        x, y = batch(step, GLOBAL_BATCH)
        loss = loss_fn(model, x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n])
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
        t = loss.detach().float().reshape(1)
        if world > 1:
            dist.all_reduce(t)
        losses.append(t.item() / world)
    return losses


def job_train_save(root: str, stage: int, precision: str, save_at: int, total: int) -> list:
    """Uninterrupted run of `total` steps that saves at `save_at` (the save changes nothing)."""
    model, opt = build(stage, precision)
    losses = train(model, opt, 0, save_at)
    zeroshard.save_checkpoint(root, model, opt, client_state={"step": save_at})
    return losses + train(model, opt, save_at, total - save_at)


def job_resume(root: str, stage: int, precision: str, steps: int, bucket: int = 700,
               resave: str | None = None) -> dict:  # fmt: skip
    """Load at this world size/stage/bucket size (from another init), optionally save again
    at once into `resave`, then train `steps` steps."""
    model, opt = build(stage, precision, bucket=bucket, seed=7)  # other init: all must load
    _, client = zeroshard.load_checkpoint(root, model, opt)
    start = client["step"]
    if resave:
        zeroshard.save_checkpoint(resave, model, opt, client_state=client)
    return {"start": start, "losses": train(model, opt, start, steps)}


def full_state(root: str) -> dict[str, torch.Tensor]:
    """Every saved tensor of a checkpoint reassembled whole ("state.exp_avg/embed.weight"...)."""
    from safetensors import safe_open

    from zeroshard.checkpoint import manifest
    from zeroshard.checkpoint.load import resolve

    folder = resolve(Path(root), None)
    body = manifest.parse(folder / "manifest.json")
    parts: dict[str, list] = {}
    for fname in body["files"]:
        with safe_open(str(folder / fname), framework="pt") as f:
            for k in f.keys():
                kind_name, start = k.rsplit("@", 1)
                parts.setdefault(kind_name, []).append((int(start), f.get_tensor(k)))
    return {k: torch.cat([t.reshape(-1) for _, t in sorted(v, key=lambda x: x[0])])
            for k, v in parts.items()}  # fmt: skip


def snapshot(model, opt) -> list[torch.Tensor]:
    """Copies of every byte a load may change: parameters, master, states, steps, lrs."""
    out = [p.detach().clone() for p in model.parameters()]
    lay = opt.layout(model)
    for i in range(len(lay.groups)):
        st = opt.shard_state(i)
        out += [t.clone() for t in st.master]
        out += [t.clone() for ts in st.state.values() for t in ts]
        out.append(torch.tensor(float(st.step)))
    out.append(torch.tensor([float(g["lr"]) for g in opt.param_groups]))
    return out


def good_checkpoint_and_target(root: str):
    """Save tag "good" under `root` from a model trained 2 steps; return another model and
    optimizer (seed 5, 1 step) to load into, and their snapshot (to prove a refused load
    changed nothing)."""
    model, opt = build(2, "fp32")
    train(model, opt, 0, 2)
    zeroshard.save_checkpoint(root, model, opt, tag="good", client_state={"step": 2})
    model2, opt2 = build(2, "fp32", seed=5)
    train(model2, opt2, 0, 1)
    return model2, opt2, snapshot(model2, opt2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

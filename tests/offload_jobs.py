"""Offload jobs run on every rank (tests/test_offload.py): one run with and one without
offload, from the same model and data, through `zeroshard.initialize`."""

from __future__ import annotations

import torch

import zeroshard
from tests.models import batch, loss_fn, make_model, param_groups
from zeroshard.shard.offload import HostOffload

GLOBAL_BATCH = 16


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def config(stage: int, offload_optimizer: bool, offload_param: bool, dtype: str,
           accumulation: int = 1) -> dict:  # fmt: skip
    zo: dict = {"stage": stage, "reduce_bucket_size": 700,
                "stage3_param_persistence_threshold": 0}  # fmt: skip
    if offload_optimizer:
        zo["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload_param:
        zo["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // _rank_world()[1],
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": dtype == "bf16"},
        "zero_optimization": zo,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95]}},
    }


def train(stage: int, offload_optimizer: bool, offload_param: bool, dtype: str = "fp32",
          steps: int = 20, optimizer: dict | None = None, accumulation: int = 1,
          thrown: str | None = None, nan_step: int | None = None) -> dict:  # fmt: skip
    """One rank's run: losses, final parameters, the memory report split, copy counts.

    `accumulation` micro-batches per step (`opt.backward` divides the loss); `thrown`:
    at step 1 a backward is thrown away with `opt.zero_grad()` first, and with "partial"
    that step's own backwards reach only the embedding (the other buckets land nothing
    after the zeroing); `nan_step`: that step's loss is multiplied by nan (a skipped step)."""
    rank, world = _rank_world()
    model = make_model()
    cfg = config(stage, offload_optimizer, offload_param, dtype, accumulation)
    if optimizer is not None:
        cfg["optimizer"] = optimizer
    groups = param_groups(model, weight_decay=0.1)
    model, opt = zeroshard.initialize(model, cfg, model_parameters=groups)
    placement = opt.placement
    off = isinstance(placement, HostOffload)

    def landed() -> int:
        return placement.copies_landed if off else 0

    n = GLOBAL_BATCH // world
    losses, in_backward, before_step, at_step = [], [], [], []
    for step in range(steps):
        if thrown is not None and step == 1:
            x, y = batch(1000 + step, GLOBAL_BATCH)
            opt.backward(loss_fn(model, x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]))
            opt.zero_grad()
        start, during = landed(), 0
        for k in range(accumulation):
            x, y = batch(step * accumulation + k, GLOBAL_BATCH)
            x, y = x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
            if thrown == "partial" and step == 1:  # only the embedding gets a gradient
                loss = model.embed(x).float().pow(2).mean()
            else:
                loss = loss_fn(model, x, y)
            if step == nan_step:
                loss = loss * float("nan")
            b0 = landed()
            opt.backward(loss)
            during += landed() - b0
        in_backward.append(during)
        before_step.append(landed() - start)
        copies_in = placement.copies_in if off else 0
        opt.step()
        at_step.append((placement.copies_in if off else 0) - copies_in)
        opt.zero_grad()
        losses.append(loss.item())
    names = {n for n, _ in model.named_parameters()}
    param_storages = {t.untyped_storage().data_ptr()
                      for t in opt.sharding.held_tensors()["params"]}  # fmt: skip
    return {
        "losses": losses,
        "params": {k: v.float() for k, v in model.state_dict().items() if k in names},
        "memory": opt.memory_report(),
        "host": opt.memory_report("host"),
        "device": opt.memory_report("device"),
        "shard_numel": sum(m.numel() for g in opt.shard_groups for m in g.master),
        "pieces": sum(len(g.master) for g in opt.shard_groups),
        "copies": (placement.copies_in, placement.copies_out) if off else (0, 0),
        # gradient copies to the host made inside backward(), before step(), and the pieces
        # step() itself copied, per step
        "landed_in_backward": in_backward,
        "landed_before_step": before_step,
        "copied_at_step": at_step,
        "skipped_steps": opt.skipped_steps,
        "master_apart": all(
            m.untyped_storage().data_ptr() not in param_storages
            for g in opt.shard_groups for m in g.master
        ),
        "master_device": sorted({str(m.device) for g in opt.shard_groups for m in g.master}),
    }


def config_error(zo: dict, placement: bool = False) -> str:
    """The message `initialize` raises on this rank for a bad offload setting."""
    model = make_model()
    kw = {"placement": HostOffload()} if placement else {}
    try:
        zeroshard.initialize(model, {"zero_optimization": zo}, **kw)
    except ValueError as e:
        return str(e)
    return "no error"


def resume(stage: int, folder: str, offload_param: bool) -> dict:
    """Train 6 steps with offload, save a universal checkpoint at step 3, load it into a run
    without offload and into one with offload, and take the last 3 steps in each; the same
    through the optimizer's state_dict, from an offloaded run and from one without offload:
    every trajectory must be the straight one."""
    rank, world = _rank_world()
    n = GLOBAL_BATCH // world

    def build(off: bool):
        model = make_model()
        cfg = config(stage, off, off and offload_param, "fp32")
        return zeroshard.initialize(model, cfg, model_parameters=param_groups(model))

    def steps(model, opt, first: int, last: int) -> list[float]:
        out = []
        for step in range(first, last):
            x, y = batch(step, GLOBAL_BATCH)
            loss = loss_fn(model, x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n])
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.item())
        return out

    model, opt = build(True)
    head = steps(model, opt, 0, 3)
    zeroshard.save_checkpoint(folder, model, opt, tag="s3")
    sd = opt.state_dict()
    tails = {"straight": steps(model, opt, 3, 6)}
    for name, off in (("into_plain", False), ("into_offload", True)):
        m2, o2 = build(off)
        zeroshard.load_checkpoint(folder, m2, o2, tag="s3")
        tails[name] = steps(m2, o2, 3, 6)
    m3, o3 = build(True)
    o3.load_state_dict(sd)
    # state_dict() holds optimizer state only: the parameters come from the checkpoint
    zeroshard.load_checkpoint(folder, m3, None, tag="s3")
    tails["state_dict"] = steps(m3, o3, 3, 6)
    # torch's way from a run without offload: model weights, then the optimizer's state_dict
    # (which has no master copy: the offloaded master is taken from the loaded parameters)
    m4, o4 = build(False)
    steps(m4, o4, 0, 3)
    msd, osd = m4.state_dict(), o4.state_dict()
    m5, o5 = build(True)
    m5.load_state_dict(msd)
    o5.load_state_dict(osd)
    tails["plain_state_dict"] = steps(m5, o5, 3, 6)
    return {"head": head, **tails}

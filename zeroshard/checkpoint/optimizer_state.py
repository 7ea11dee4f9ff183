"""Per-rank optimizer checkpoints: each rank saves and restores its own shard.

A checkpoint loads back at the same world size, stage and parameter layout; anything else is
refused with a message that says what differs (re-sharding to another world size is a
separate feature). State tensors are saved contiguous (one tensor per state per flat buffer),
so the file does not depend on bucket boundaries beyond the recorded layout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..optimizer import ZeroOptimizer

FORMAT_VERSION = 1


def _layout(opt: ZeroOptimizer) -> list[dict[str, Any]]:
    return [
        {
            "group": e.group,
            "dtype": str(e.flat.dtype),
            "param_numel": e.flat.param_numel,
            "shard_numel": e.flat.shard_numel,
            "buckets": [b.numel for b in e.flat.buckets],
        }
        for e in opt._entries
    ]


def optimizer_state_dict(opt: ZeroOptimizer) -> dict[str, Any]:
    index = {}
    groups = []
    for g in opt.param_groups:
        ids = []
        for p in g["params"]:
            index.setdefault(id(p), len(index))
            ids.append(index[id(p)])
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ids})
    state: dict[int, dict[str, Any]] = {}
    for i, e in enumerate(opt._entries):
        s: dict[str, Any] = {"step": e.step}
        for name, pieces in e.state.items():
            s[name] = torch.cat([p.detach() for p in pieces]).clone()
        if e.master_shard is not None:
            s["master"] = e.master_shard.detach().clone()
        if e.generic is not None:
            s["generic"] = e.generic.state_dict()
        state[i] = s
    return {
        "zeroshard": {
            "version": FORMAT_VERSION,
            "stage": opt.stage,
            "world_size": opt.comm.world_size,
            "rank": opt.comm.rank,
            "rule": opt.rule,
            "layout": _layout(opt),
        },
        "state": state,
        "param_groups": groups,
        "loss_scaler": opt.loss_scaler.state_dict() if opt.loss_scaler else None,
        "lr_scheduler": opt.lr_scheduler.state_dict() if opt.lr_scheduler else None,
    }


def _check(opt: ZeroOptimizer, sd: dict[str, Any]) -> None:
    meta = sd.get("zeroshard")
    if meta is None:
        raise ValueError(
            "not a zeroshard optimizer checkpoint (no 'zeroshard' section): a plain "
            "torch.optim state_dict cannot be loaded into a sharded optimizer"
        )
    problems = []
    for key, mine in (
        ("world_size", opt.comm.world_size),
        ("rank", opt.comm.rank),
        ("stage", opt.stage),
        ("rule", opt.rule),
    ):
        if meta[key] != mine:
            problems.append(f"{key}: checkpoint {meta[key]!r}, this run {mine!r}")
    if not problems and meta["layout"] != _layout(opt):
        problems.append("parameter layout differs (other parameters, groups or bucket size)")
    if problems:
        raise ValueError(
            f"rank {opt.comm.rank}: cannot load this optimizer checkpoint: "
            + "; ".join(problems)
            + ". Checkpoints load at the same world size, stage and model."
        )


@torch.no_grad()
def load_optimizer_state_dict(opt: ZeroOptimizer, sd: dict[str, Any]) -> None:
    _check(opt, sd)
    for group, saved in zip(opt.param_groups, sd["param_groups"]):
        for k, v in saved.items():
            if k != "params":
                group[k] = v
    for i, e in enumerate(opt._entries):
        s = sd["state"][i] if i in sd["state"] else sd["state"][str(i)]
        e.step = int(s["step"])
        for name, pieces in e.state.items():
            src = s[name].to(pieces[0].device)
            offset = 0
            for p in pieces:
                p.copy_(src[offset : offset + p.numel()])
                offset += p.numel()
        if e.generic is not None:
            e.generic.load_state_dict(s["generic"])
        if e.master_shard is not None and "master" in s:
            e.master_shard.copy_(s["master"])
            for c, m in zip(e.model_copies, e.master):
                c.copy_(m)
    if opt.loss_scaler is not None and sd.get("loss_scaler"):
        opt.loss_scaler.load_state_dict(sd["loss_scaler"])
    if opt.lr_scheduler is not None and sd.get("lr_scheduler"):
        opt.lr_scheduler.load_state_dict(sd["lr_scheduler"])
    # bf16/fp16 models take their weights from the restored fp32 master (DeepSpeed's
    # load_from_fp32_weights): refresh every rank's full parameters.
    if any(e.master_shard is not None for e in opt._entries):
        opt._gather_params()

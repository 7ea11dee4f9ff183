"""`ZeroOptimizer.state_dict()` / `load_state_dict()`: each rank saves and restores its own
shard in memory (torch's optimizer API), and `restore_optimizer`, the one place where a
checkpoint (this one or a universal one) restores counters, hyperparameters, the loss scaler
and the lr scheduler, then makes the parameters follow the restored master.

A checkpoint loads back at the same world size, stage, parameter layout and state codec;
anything else is refused with a message that says what differs. Re-sharding, and converting
states between codecs (fp32 AdamW <-> AdamW8bit, another block_size), is the universal
checkpoint's job (`zeroshard.save_checkpoint` / `load_checkpoint`): another codec lays the
parameters out on other block boundaries, so a rank's in-memory shard of one is not a
rank's shard of the other. State tensors are saved contiguous (one tensor per state per flat
buffer), so the file does not depend on bucket boundaries beyond the recorded layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from zeroshard.quant8.codec import CODEC_KEYS, group_codec

ZeroOptimizer = Any  # the optimizer imports this module: typed by its public API only

FORMAT_VERSION = 1


def _layout(opt: ZeroOptimizer) -> list[dict[str, Any]]:
    """What must match for a shard to load: per shard group, its params' shapes and flat
    offsets (bucket boundaries move them) and the shard's length."""
    layout = opt.layout()
    params: dict[int, list[list[Any]]] = {}
    for p in layout.params:
        params.setdefault(p.shard_group, []).append([list(p.shape), p.flat_offset])
    return [
        {
            "group": g.group,
            "dtype": str(g.dtype),
            "shard_numel": g.shard_numel,
            "params": params.get(g.index, []),
        }
        for g in layout.groups
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
    for g in opt.layout().groups:
        st = opt.shard_state(g.index)
        s: dict[str, Any] = {"step": st.step}
        if st.generic is not None:
            s["generic"] = st.generic.state_dict()
        else:
            for name, pieces in _state_lists(opt, g.index, st).items():
                s[name] = torch.cat([p.detach().reshape(-1) for p in pieces]).clone()
        if not opt.placement.shares_params(g.dtype):  # the master is a copy (bf16, offload)
            s["master"] = torch.cat([m.detach().reshape(-1) for m in st.master]).clone()
        state[g.index] = s
    return {
        "zeroshard": {
            "version": FORMAT_VERSION,
            "stage": opt.stage,
            "world_size": opt.comm.world_size,
            "rank": opt.comm.rank,
            "rule": opt.rule,
            "layout": _layout(opt),
            "codecs": _codecs(opt),
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
    if "codecs" in meta and meta["codecs"] != _codecs(opt):
        problems.append(f"state codec per param group: checkpoint {meta['codecs']}, this run "
                        f"{_codecs(opt)}")  # fmt: skip
    if not problems and meta["layout"] != _layout(opt):
        problems.append("parameter layout differs (other parameters, groups or bucket size)")
    if problems:
        raise ValueError(
            f"rank {opt.comm.rank}: cannot load this optimizer checkpoint: "
            + "; ".join(problems)
            + ". Checkpoints load at the same world size, stage and model; to change the "
            "world size, stage or state codec (fp32 AdamW <-> AdamW8bit, another block_size) "
            "save with zeroshard.save_checkpoint and load with zeroshard.load_checkpoint."
        )


def _codecs(opt: ZeroOptimizer) -> list[Any]:
    """How each param group stores its state (None: fp32), as `codec.config()` says."""
    out = []
    for i, g in enumerate(opt.param_groups):
        config = getattr(group_codec(opt.codec, g, f"param_groups[{i}]"), "config", None)
        out.append(config() if config is not None else None)
    return out


@torch.no_grad()
def load_optimizer_state_dict(opt: ZeroOptimizer, sd: dict[str, Any]) -> None:
    _check(opt, sd)
    steps = {}
    for g in opt.layout().groups:
        i = g.index
        s = sd["state"][i] if i in sd["state"] else sd["state"][str(i)]
        steps[i] = int(s["step"])
        st = opt.shard_state(i)
        if st.generic is not None:
            st.generic.load_state_dict(s["generic"])
        else:
            for name, pieces in _state_lists(opt, i, st).items():
                _copy_into(pieces, s[name])
        if not opt.placement.shares_params(g.dtype):
            if "master" in s:
                _copy_into(st.master, s["master"])
            else:  # saved where the master was the parameters: they hold its values
                opt.shard_groups[i].refresh_master()
    restore_optimizer(opt, sd["param_groups"], steps, sd.get("loss_scaler"),
                      sd.get("lr_scheduler"))  # fmt: skip


@torch.no_grad()
def restore_optimizer(
    opt: ZeroOptimizer,
    param_groups: Sequence[Mapping[str, Any]],
    steps: Mapping[int, int],
    loss_scaler: Mapping[str, Any] | None,
    lr_scheduler: Mapping[str, Any] | None,
    sync: bool = True,
) -> None:
    """After the master and state tensors were written: shard-group step counts (`steps`:
    shard group -> count), param-group hyperparameters, the loss scaler and the lr scheduler;
    then (`sync`; a caller that must first agree with the other ranks calls
    `opt.sync_params_from_master()` itself) the parameters follow the restored fp32 master
    on every rank (DeepSpeed's load_from_fp32_weights) and states kept in another form are
    stored. A group's state codec settings (AdamW8bit's block_size, min_8bit_size) stay this
    run's: its states are already laid out and stored by them."""
    for i, n in steps.items():
        opt.set_step(i, int(n))
    for group, saved in zip(opt.param_groups, param_groups):
        for k, v in saved.items():
            if k != "params" and k not in CODEC_KEYS:
                group[k] = tuple(v) if isinstance(group.get(k), tuple) else v
    if opt.loss_scaler is not None and loss_scaler:
        opt.loss_scaler.load_state_dict(loss_scaler)
    if opt.lr_scheduler is not None and lr_scheduler:
        opt.lr_scheduler.load_state_dict(lr_scheduler)
    if sync:
        opt.sync_params_from_master()


def _state_lists(opt: ZeroOptimizer, index: int, st: Any) -> Mapping[str, list[torch.Tensor]]:
    """State tensors of shard group `index` by name: the fp32 pieces, or, when its codec
    stores another form (8-bit blocks), the stored tensors of each parameter piece in shard
    order (saved and restored as they are, never re-encoded)."""
    if st.pieces is None:
        return st.state
    out: dict[str, list[torch.Tensor]] = {}
    for p, pc in opt.layout().local_pieces():
        if p.shard_group == index:
            for name, (t, _) in sorted(st.pieces(pc.shard_offset, pc.numel).items()):
                out.setdefault(name, []).append(t)
    return out


def _copy_into(pieces: list[torch.Tensor], src: torch.Tensor) -> None:
    """Write a saved contiguous tensor back into the live pieces it was cut from."""
    src = src.to(pieces[0].device) if pieces else src
    offset = 0
    for p in pieces:
        p.copy_(src[offset : offset + p.numel()].view_as(p))
        offset += p.numel()

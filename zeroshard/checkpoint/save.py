"""`save_checkpoint`: each rank writes exactly what it holds, keyed by parameter name and offset.

Nothing is gathered: a rank's file holds its pieces of the fp32 master and of every optimizer
state (views of the live shard tensors, streamed to disk), plus the parameters the optimizer
does not hold (frozen ones: by the rank(s) holding them) and, on rank 0, the buffers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from zeroshard.checkpoint import async_save as background
from zeroshard.checkpoint import commit, dist_util, manifest
from zeroshard.checkpoint import optimizer_view as L
from zeroshard.checkpoint.st_stream import ByteCounter, Entry, write_file

LAST_SAVE_STATS: dict[str, int] = {}  # bytes a save materialised (peak), for tests/bench


@dataclass
class Plan:
    """What this rank writes, and the manifest fields it knows."""

    entries: list[Entry] = field(default_factory=list)
    pieces: list[list[Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    rank: int = 0  # taken at the call: a background write may outlive the default group

    def snapshot(self, counter: ByteCounter) -> None:
        """Copy every source to CPU now (async save: training may overwrite them)."""
        pin = torch.cuda.is_available()
        for e in self.entries:
            t = e.source() if callable(e.source) else e.source
            c = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
            c.copy_(t.detach(), non_blocking=pin)
            counter.add(c.numel() * c.element_size())
            e.source = c
        if pin:
            torch.cuda.synchronize()


def shard_slice(tensors: list[Tensor], offset: int, numel: int) -> Tensor:
    """Elements [offset, offset+numel) of the concatenation of `tensors` (a view when the
    range lies in one tensor, which is always the case for a layout piece)."""
    pos = 0
    for t in tensors:
        if pos <= offset and offset + numel <= pos + t.numel():
            return t.reshape(-1)[offset - pos : offset - pos + numel]
        pos += t.numel()
    return torch.cat([t.reshape(-1) for t in tensors])[offset : offset + numel]


def _state_pieces(st: L.ShardState, offset: int, numel: int) -> list[tuple[str, Tensor]]:
    """(state name, 1-D tensor) of one parameter piece: the codec's stored form (8-bit codes
    and absmax, saved as they are) when it keeps one, else the fp32 state."""
    if st.pieces is not None:
        return [(k, t) for k, (t, _) in sorted(st.pieces(offset, numel).items())]
    return [(k, shard_slice(st.state[k], offset, numel)) for k in sorted(st.state)]


def state_codec(opt: Any) -> dict[str, Any] | None:
    """How the optimizer stores its state, as the manifest records it (None: fp32)."""
    config = getattr(getattr(opt, "codec", None), "config", None)
    return config() if config is not None else None


def _hyper(group: dict[str, Any]) -> dict[str, Any]:
    return manifest.to_json({k: v for k, v in group.items() if k != "params"}, "param_groups")


def build_plan(model: nn.Module, opt: Any, client_state: Any) -> Plan:
    rank, world = dist_util.rank_world()
    plan = Plan(rank=rank)
    covered: set[str] = set()
    steps: dict[str, int] = {}
    state_names: list[str] = []
    group_of: dict[str, int] = {}
    if opt is not None:
        lay = L.layout(opt, model)
        states = [L.shard_state(opt, i) for i in range(len(lay.groups))]
        for g in lay.groups:
            steps[str(g.group)] = max(steps.get(str(g.group), 0), states[g.index].step)
        state_names = sorted({k for s in states for k in s.state_names()})
        covered = {p.name for p in lay.params if p.name is not None}
        group_of = {p.name: p.group for p in lay.params if p.name is not None}
        if lay.stage > 0 or rank == 0:  # stage 0: replicated, rank 0 writes
            for p, pc in lay.local_pieces():
                st = states[p.shard_group]
                src = shard_slice(st.master, pc.shard_offset, pc.numel)
                plan.entries.append(Entry(manifest.key("master", p.name, pc.start),
                                          (pc.numel,), src.dtype, src))  # fmt: skip
                for sname, t in _state_pieces(st, pc.shard_offset, pc.numel):
                    plan.entries.append(Entry(manifest.key(f"state.{sname}", p.name, pc.start),
                                              (t.numel(),), t.dtype, t))  # fmt: skip
                plan.pieces.append(["master", p.name, pc.start, pc.numel])
    params = []
    for mp in L.model_pieces(model, rank):
        params.append({"name": mp.name, "shape": list(mp.shape), "trainable": mp.trainable,
                       "dtype": manifest.dtype_name(mp.dtype)})  # fmt: skip
        if mp.name in group_of:  # which group's state codec stored it (AdamW8bit block size)
            params[-1]["group"] = group_of[mp.name]
        if mp.name in covered or not mp.writer:
            continue
        for start, view in mp.views:
            plan.entries.append(Entry(manifest.key("weight", mp.name, start), (view.numel(),),
                                      view.dtype, view))  # fmt: skip
            plan.pieces.append(["weight", mp.name, start, view.numel()])
    buffers = []
    for name, b in persistent_buffers(model):
        dt = manifest.dtype_name(b.dtype)
        buffers.append({"name": name, "shape": list(b.shape), "dtype": dt})
        if rank == 0:
            plan.entries.append(Entry(manifest.key("buffer", name), tuple(b.shape), b.dtype, b))
            plan.pieces.append(["buffer", name, 0, b.numel()])
    groups = [_hyper(g) for g in opt.param_groups] if opt is not None else []
    scaler = getattr(opt, "loss_scaler", None)
    sched = getattr(opt, "lr_scheduler", None)
    plan.meta = {
        "format": manifest.FORMAT, "version": manifest.VERSION, "world_size": world,
        "stage": getattr(opt, "stage", L.stage_of(model)), "rule": getattr(opt, "rule", None),
        "params": params, "buffers": buffers, "param_groups": groups, "steps": steps,
        "state_names": state_names, "state_codec": state_codec(opt),
        "loss_scaler": manifest.to_json(scaler.state_dict(), "loss_scaler") if scaler else None,
        "lr_scheduler": manifest.to_json(sched.state_dict(), "lr_scheduler") if sched else None,
        "client_state": manifest.to_json(client_state or {}, "client_state"),
    }  # fmt: skip
    return plan


def persistent_buffers(model: nn.Module) -> list[tuple[str, Tensor]]:
    out = []
    for mname, m in model.named_modules():
        for bname, b in m.named_buffers(recurse=False):
            if b is not None and bname not in m._non_persistent_buffers_set:
                out.append((f"{mname}.{bname}" if mname else bname, b))
    return out


def _write(plan: Plan, counter: ByteCounter, folder: Path, desc: str) -> dict[str, Any]:
    name = manifest.rank_file(plan.rank)
    sha, size = write_file(folder / name, plan.entries, {"format": "pt"}, counter, desc=desc)
    info = {"rank": plan.rank, "size": size, "sha256": sha, "pieces": plan.pieces}
    return {"files": {name: info}, "meta": plan.meta if plan.rank == 0 else None}


def _manifest(parts: list[dict[str, Any]]) -> str:
    body = dict(parts[0]["meta"])
    body["files"] = {n: i for p in parts for n, i in p["files"].items()}
    return manifest.render(body)


def save_checkpoint(
    save_dir: str | os.PathLike,
    model: nn.Module,
    optimizer: Any = None,
    tag: str | None = None,
    client_state: dict[str, Any] | None = None,
    async_save: bool = False,
) -> Path:
    """Save under `save_dir/tag` (call on every rank); returns the folder.

    `tag` defaults to `step<N>`; it is a name inside `save_dir`, not a path. `client_state`
    must be JSON data. With `async_save=True` the state is copied to CPU now and written by
    a background thread on the checkpoint's own group (it survives
    `dist.destroy_process_group()`); the next save, load, `zeroshard.checkpoint.wait()` or
    the process's exit waits for it and raises its error (at exit: exit code 1). A call
    made on only some ranks raises `CheckpointError` naming the missing ranks after
    $ZEROSHARD_CKPT_ARRIVAL_TIMEOUT_S seconds (default 300).
    """
    background.wait()
    root = Path(save_dir)
    dist_util.arrive("save_checkpoint")
    pg = dist_util.group()
    counter = ByteCounter()
    error: BaseException | None = None
    plan = Plan()
    try:
        plan = build_plan(model, optimizer, client_state)
        if tag is None:
            tag = f"step{max(plan.meta['steps'].values(), default=0)}"
        commit.check_name(tag, "tag")
        if async_save:
            plan.snapshot(counter)
    except BaseException as e:  # every rank learns of it before anything is written
        error = e
    where = dist_util.faults(error, pg)
    if where:
        raise commit.CheckpointError(f"checkpoint save to {root} failed ({where})") from error
    assert tag is not None

    def run() -> Path:
        write = lambda d: _write(plan, counter, d, f"saving {tag}")  # noqa: E731
        out = commit.commit(root, tag, write, _manifest, pg)
        LAST_SAVE_STATS.update(peak_bytes=counter.peak)
        return out

    if async_save:
        background.start(run)
        return root / tag
    return run()


"""Migration in: continue a DeepSpeed `engine.save_checkpoint` folder (ZeRO 1-3) in zeroshard,
at any world size and stage.

DeepSpeed's files are pickles. They are read with `torch.load(weights_only=True)` plus the
three DeepSpeed names DeepSpeed 0.19 puts in them mapped to inert stand-ins (a loss scaler
object, the ZeRO stage enum, a fragment-address record): nothing of DeepSpeed is imported or
run, and any other global makes the load fail with a message naming the file.

Layouts (as DeepSpeed's own zero_to_fp32.py reads them): ZeRO 1/2 - per param group, the
rank-order concatenation of `single_partition_of_fp32_groups[g]` (and of the base optimizer's
per-group `exp_avg`/`exp_avg_sq`) is the group's flat vector, parameters in `param_shapes[g]`
order with `param_alignment_paddings`. ZeRO 3 - every parameter is split in ceil(n/world)
element runs, rank r holding run r; a rank's `fp32_flat_groups` are its runs back to back.
The per-parameter fp32 tensors are reassembled in CPU memory (one full copy of master and
moments: a migration, not the universal format's bounded path), then every rank copies in
the pieces it holds.
"""

from __future__ import annotations

import glob
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zeroshard.checkpoint import commit, dist_util, verify
from zeroshard.checkpoint import optimizer_view as L
from zeroshard.checkpoint.save import persistent_buffers, shard_slice


class _Inert:
    """Stand-in for a DeepSpeed record object: keeps its fields, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _Stage(int):
    """Stand-in for deepspeed.runtime.zero.config.ZeroStageEnum (an int enum)."""


ALLOWED = [
    (_Inert, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (_Inert, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
    (_Stage, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (_Inert, "deepspeed.utils.tensor_fragment.fragment_address"),
]


def safe_load(path: Path) -> Any:
    """`torch.load(weights_only=True)` with only the names above allowed, of a regular file
    inside its folder (no symlink leading elsewhere, no device)."""
    path = verify.inside(path.parent, path.name)
    try:
        with torch.serialization.safe_globals(ALLOWED):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, EOFError, zip errors...
        first = str(e).strip().splitlines()
        why = next((ln for ln in first if "GLOBAL" in ln), first[0] if first else "")
        raise ValueError(f"{path}: refused or unreadable DeepSpeed file ({why.strip()})") from None


def _files(folder: Path) -> tuple[list[Path], list[Path]]:
    optim = sorted(Path(p) for p in glob.glob(str(folder / "*zero_pp_rank_*_optim_states.pt")))
    model = sorted(Path(p) for p in glob.glob(str(folder / "*model_states.pt")))
    key = lambda p: int(p.name.split("zero_pp_rank_")[1].split("_")[0])  # noqa: E731
    if not optim:
        raise ValueError(f"{folder}: no *_optim_states.pt files (not a ZeRO checkpoint)")
    return sorted(optim, key=key), sorted(model, key=lambda p: key(p) if "zero_pp" in p.name else 0)


def read_full(folder: Path) -> dict[str, Any]:
    """{"params": {name: {"master", "exp_avg", "exp_avg_sq"}}, "step", "groups", "module"}"""
    optim_files, model_files = _files(folder)
    optims = [safe_load(f)["optimizer_state_dict"] for f in optim_files]
    ms = safe_load(model_files[0])
    world = len(optims)
    stage = int(optims[0]["zero_stage"])
    shapes = [dict(g) for g in ms["param_shapes"]]
    out: dict[str, dict[str, torch.Tensor]] = {}
    if stage <= 2:
        base = [o["base_optimizer_state"] for o in optims]
        pads = optims[0].get("param_alignment_paddings")
        for g, names in enumerate(shapes):
            flat = {"master": torch.cat([o["single_partition_of_fp32_groups"][g] for o in optims])}
            for k in ("exp_avg", "exp_avg_sq"):
                flat[k] = torch.cat([b["state"][g][k].reshape(-1) for b in base])
            off = 0
            for i, (name, shape) in enumerate(names.items()):
                n = math.prod(shape)
                out[name] = {k: v[off : off + n].view(*shape).clone() for k, v in flat.items()}
                off += n + (pads[g][i] if pads else 0)
        step = int(base[0]["state"][0]["step"])
        groups = base[0]["param_groups"]
    else:
        inner = [o["optimizer_state_dict"] for o in optims]
        flats = {"master": [torch.cat([t.reshape(-1) for t in o["fp32_flat_groups"]])
                            for o in optims]}  # fmt: skip
        for k in ("exp_avg", "exp_avg_sq"):
            flats[k] = [torch.cat([s[k].reshape(-1) for _, s in sorted(o["state"].items())])
                        for o in inner]  # fmt: skip
        off = 0
        for names in shapes:
            for name, shape in names.items():
                n = math.prod(shape)
                pn = -(-n // world)
                out[name] = {k: torch.cat([f[off : off + pn] for f in fl])[:n].view(*shape)
                             for k, fl in flats.items()}  # fmt: skip
                off += pn
        step = int(next(iter(inner[0]["state"].values()))["step"])
        groups = inner[0]["param_groups"]
    return {"params": out, "step": step, "groups": groups, "module": ms.get("module", {}),
            "client": {"step": int(ms.get("global_steps", step))}}  # fmt: skip


@torch.no_grad()
def load_deepspeed(folder: Path, model: nn.Module, opt: Any, pg: Any) -> tuple[Path, dict]:
    rank, _ = dist_util.rank_world()
    problem, ds = "", {}
    try:
        ds = read_full(folder)
        have = ds["params"]
        for mp in L.model_pieces(model, rank):
            src = have.get(mp.name)
            if src is None and mp.name not in ds["module"]:
                raise ValueError(f"{folder}: parameter {mp.name!r} not in the DeepSpeed files")
            shape = tuple(src["master"].shape) if src else tuple(ds["module"][mp.name].shape)
            if shape != mp.shape:
                raise ValueError(f"{folder}: {mp.name!r} shape {shape}, model {mp.shape}")
    except Exception as e:  # noqa: BLE001 - every fault reaches every rank: no hang
        kind = "" if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: "
        problem = f"rank {rank}: {kind}{e}"
    problems = [p for p in dist_util.all_gather_obj(problem, pg) if p]
    if problems:
        raise commit.CheckpointError(f"cannot load DeepSpeed checkpoint {folder}: "
                                     + " | ".join(problems) + ". Nothing was modified.")
    have = ds["params"]
    covered: set[str] = set()
    if opt is not None:
        lay = L.layout(opt, model)
        for p, pc in lay.local_pieces():
            st = L.shard_state(opt, p.shard_group)
            full = have[p.name]
            sl = slice(pc.start, pc.start + pc.numel)
            shard_slice(st.master, pc.shard_offset, pc.numel).copy_(full["master"].reshape(-1)[sl])
            for k, ts in st.state.items():
                shard_slice(ts, pc.shard_offset, pc.numel).copy_(full[k].reshape(-1)[sl])
            covered.add(p.name)
        for g in lay.groups:
            L.set_step(opt, g.index, ds["step"])
        for group, saved in zip(opt.param_groups, ds["groups"]):
            for k in ("lr", "betas", "eps", "weight_decay"):
                if k in saved and k in group:
                    group[k] = tuple(saved[k]) if isinstance(group[k], tuple) else saved[k]
    for mp in L.model_pieces(model, rank):
        if mp.name in covered:
            continue
        full = have[mp.name]["master"] if mp.name in have else ds["module"][mp.name]
        for start, view in mp.views:
            view.copy_(full.reshape(-1)[start : start + view.numel()])
    for name, b in persistent_buffers(model):
        if name in ds["module"]:
            b.copy_(ds["module"][name])
    if opt is not None:
        L.sync_params_from_master(opt)
    else:
        L.after_model_write(model)
    return folder, ds["client"]

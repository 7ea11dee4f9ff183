"""`load_checkpoint`: any world size, stage, master precision and bucket size, no offline step.

Each rank lists what it holds (`layout.local_pieces()` for the optimizer, its views of the
parameters the optimizer does not hold, the buffers), finds the saved pieces that overlap,
and checks - before touching anything - that the checkpoint fits (names, shapes, optimizer
states, full coverage) and that every file it will read is present with the manifest's size
and sha256. All ranks exchange their findings; if any rank found a fault, every rank raises
with every message and nothing was modified. Only then are the slices read
(`safe_open(...).get_slice`) into the live tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from zeroshard.checkpoint import async_save as background
from zeroshard.checkpoint import commit, dist_util, manifest
from zeroshard.checkpoint import optimizer_view as L
from zeroshard.checkpoint.save import _persistent_buffers, shard_slice, state_codec
from zeroshard.checkpoint.st_stream import sha256_file
from zeroshard.shard.optimizer_state import restore_optimizer
from zeroshard.timing import progress


@dataclass
class Read:
    file: str
    key: str
    lo: int  # slice of the saved 1-D piece (buffers: whole tensor, lo = hi = -1)
    hi: int
    dst: Tensor  # 1-D view of a live tensor


class _Index:
    """Saved pieces by (kind, param): [(start, numel, file)]."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.pieces: dict[tuple[str, str], list[tuple[int, int, str]]] = {}
        for fname, info in body["files"].items():
            for kind, name, start, numel in info["pieces"]:
                self.pieces.setdefault((kind, name), []).append((start, numel, fname))

    def reads(self, kind: str, saved_kind: str, name: str, start: int, dst: Tensor,
              per: int = 1) -> list[Read]:  # fmt: skip
        """Reads filling param `name`'s elements [start, ...) into `dst`, which holds one
        entry per `per` elements (8-bit absmax: one per block; pieces start on blocks)."""
        first = start // per
        end = first + dst.numel()
        out, covered = [], 0
        for s, n, fname in self.pieces.get((kind, name), []):
            lo, hi = s // per, -(-(s + n) // per)
            a, z = max(lo, first), min(hi, end)
            if a < z:
                out.append(Read(fname, manifest.key(saved_kind, name, s), a - lo, z - lo,
                                dst[a - first : z - first]))  # fmt: skip
                covered += z - a
        if covered != dst.numel():
            raise ValueError(
                f"parameter {name!r} entries [{first}, {end}): the checkpoint's {kind} pieces "
                f"cover {covered} of {dst.numel()} (files missing from the manifest?)"
            )
        return out


def resolve(root: Path, tag: str | None) -> Path:
    if tag is None:
        tag = commit.read_latest(root)
        if tag is None:
            raise ValueError(f"no checkpoint in {root}: {root / commit.LATEST} does not exist")
    folder = root / tag
    if not folder.is_dir():
        raise ValueError(f"{folder}: checkpoint folder does not exist")
    return folder


def _check_fit(body: dict[str, Any], model: nn.Module, opt: Any, folder: Path) -> None:
    saved = {p["name"]: p for p in body["params"]}
    mine = L.model_pieces(model, 0)
    problems = []
    for mp in mine:
        s = saved.get(mp.name)
        if s is None:
            problems.append(f"parameter {mp.name!r} is not in the checkpoint")
        elif tuple(s["shape"]) != mp.shape:
            problems.append(f"parameter {mp.name!r}: checkpoint shape {tuple(s['shape'])}, "
                            f"model {mp.shape}")  # fmt: skip
    extra = set(saved) - {mp.name for mp in mine}
    if extra:
        problems.append(f"checkpoint parameters not in the model: {sorted(extra)[:5]}")
    bufs = {b["name"]: b for b in body["buffers"]}
    for name, b in _persistent_buffers(model):
        if name not in bufs or tuple(bufs[name]["shape"]) != tuple(b.shape):
            problems.append(f"buffer {name!r} missing or of another shape in the checkpoint")
    if opt is not None:
        if body.get("rule") is None:
            problems.append("the checkpoint has no optimizer state (saved without optimizer)")
        elif body["rule"] != opt.rule:
            problems.append(f"optimizer rule: checkpoint {body['rule']!r}, this run {opt.rule!r}")
        if body.get("state_codec") != state_codec(opt):
            problems.append(f"optimizer state codec: checkpoint {body.get('state_codec')}, this "
                            f"run {state_codec(opt)} (None: fp32 states; states are not "
                            "converted between codecs)")  # fmt: skip
        if len(body["param_groups"]) != len(opt.param_groups):
            problems.append(f"param groups: checkpoint {len(body['param_groups'])}, "
                            f"optimizer {len(opt.param_groups)}")  # fmt: skip
    if problems:
        raise ValueError(f"{folder / commit.MANIFEST}: does not fit this model/optimizer: "
                         + "; ".join(problems))  # fmt: skip


def plan_reads(body: dict[str, Any], model: nn.Module, opt: Any, rank: int) -> list[Read]:
    index = _Index(body)
    reads: list[Read] = []
    covered: set[str] = set()
    if opt is not None:
        lay = L.layout(opt, model)
        states = [L.shard_state(opt, i) for i in range(len(lay.groups))]
        names = sorted({k for s in states for k in s.state_names()})
        if states and names != sorted(body["state_names"]) and any(s.step for s in states):
            raise ValueError(f"optimizer states: checkpoint {body['state_names']}, this run "
                             f"{names}")  # fmt: skip
        covered = {p.name for p in lay.params}
        for p, pc in lay.local_pieces():
            st = states[p.shard_group]
            dst = shard_slice(st.master, pc.shard_offset, pc.numel)
            reads += index.reads("master", "master", p.name, pc.start, dst)
            if st.pieces is not None:  # a codec's stored form: moved as it is
                for sname, (dst, per) in sorted(st.pieces(pc.shard_offset, pc.numel).items()):
                    reads += index.reads("master", f"state.{sname}", p.name, pc.start, dst, per)
                continue
            for sname, ts in st.state.items():
                dst = shard_slice(ts, pc.shard_offset, pc.numel)
                reads += index.reads("master", f"state.{sname}", p.name, pc.start, dst)
    for mp in L.model_pieces(model, rank):
        if mp.name in covered:
            continue
        kind = "weight" if (("weight", mp.name) in index.pieces) else "master"
        for start, view in mp.views:
            reads += index.reads(kind, kind, mp.name, start, view)
    for name, b in _persistent_buffers(model):
        fname = index.pieces[("buffer", name)][0][2]
        reads.append(Read(fname, manifest.key("buffer", name), -1, -1, b))
    return reads


def _verify_files(folder: Path, body: dict[str, Any], files: set[str]) -> None:
    for fname in sorted(files):
        path = folder / fname
        info = body["files"][fname]
        if not path.exists():
            raise ValueError(f"{path}: missing (written by rank {info['rank']})")
        size = path.stat().st_size
        if size != info["size"]:
            raise ValueError(f"{path}: size {size} bytes, manifest says {info['size']} "
                             "(truncated or overwritten)")  # fmt: skip
        if sha256_file(path) != info["sha256"]:
            raise ValueError(f"{path}: sha256 mismatch (the file is corrupted)")


@torch.no_grad()
def _apply(folder: Path, body: dict[str, Any], reads: list[Read], model: nn.Module,
           opt: Any) -> None:  # fmt: skip
    handles: dict[str, Any] = {}
    for r in progress(reads, f"loading {folder.name}", unit="piece"):
        if r.file not in handles:
            handles[r.file] = safe_open(str(folder / r.file), framework="pt")
        f = handles[r.file]
        src = f.get_tensor(r.key) if r.lo < 0 else f.get_slice(r.key)[r.lo : r.hi]
        r.dst.copy_(src.reshape(r.dst.shape))
    if opt is None:
        L.after_model_write(model)
        return
    lay = L.layout(opt, model)
    steps = {g.index: int(body["steps"].get(str(g.group), 0)) for g in lay.groups}
    restore_optimizer(opt, body["param_groups"], steps, body.get("loss_scaler"),
                      body.get("lr_scheduler"))  # fmt: skip


def load_checkpoint(
    load_dir: str | os.PathLike,
    model: nn.Module,
    optimizer: Any = None,
    tag: str | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Load a checkpoint (the `latest` tag by default) at any world size and stage; call on
    every rank. A zeroshard folder or a DeepSpeed `engine.save_checkpoint` folder. Returns
    (checkpoint folder, client_state). On any fault every rank raises `CheckpointError`
    naming the file and the fault, and the model and optimizer are untouched."""
    background.wait()
    rank, _ = dist_util.rank_world()
    root = Path(load_dir)
    pg = dist_util.group()
    problem = ""
    folder, body, reads = root, {}, []
    try:
        folder = resolve(root, tag)
        if not (folder / commit.MANIFEST).exists() and _looks_deepspeed(folder):
            from zeroshard.checkpoint.deepspeed_in import load_deepspeed

            return load_deepspeed(folder, model, optimizer, pg)
        body = manifest.parse(folder / commit.MANIFEST)
        _check_fit(body, model, optimizer, folder)
        reads = plan_reads(body, model, optimizer, rank)
        _verify_files(folder, body, {r.file for r in reads})
    except (ValueError, OSError, KeyError) as e:
        problem = f"rank {rank}: {e}"
    problems = [p for p in dist_util.all_gather_obj(problem, pg) if p]
    if problems:
        raise commit.CheckpointError(
            f"cannot load checkpoint {folder}: " + " | ".join(problems)
            + ". Nothing was modified."
        )
    _apply(folder, body, reads, model, optimizer)
    return folder, body["client_state"]


def _looks_deepspeed(folder: Path) -> bool:
    return any(folder.glob("*_model_states.pt"))

"""`load_checkpoint`: any world size, stage, master precision and bucket size, no offline step.

Each rank lists what it holds (`layout.local_pieces()` for the optimizer, its views of the
parameters the optimizer does not hold, the buffers), finds the saved pieces that overlap,
and checks - before touching anything - the manifest's schema, that the checkpoint fits
(names, shapes, hyperparameter types, optimizer states, full coverage) and that every file
it will read is a regular file inside the folder with the manifest's size, sha256 and
tensors (verify.py). All ranks exchange their findings; if any rank found a fault, every
rank raises with every message and nothing was modified. Only then are the slices read
(`safe_open(...).get_slice`) into the live tensors, keeping the values they replace until
all ranks report success.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from math import prod
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from zeroshard.checkpoint import async_save as background
from zeroshard.checkpoint import commit, convert, dist_util, manifest, verify
from zeroshard.checkpoint import optimizer_view as L
from zeroshard.checkpoint.save import persistent_buffers, shard_slice
from zeroshard.shard.optimizer_state import restore_optimizer
from zeroshard.timing import progress


@dataclass
class Read:
    file: str
    key: str
    lo: int  # slice of the saved 1-D piece (buffers: whole tensor, lo = hi = -1)
    hi: int
    dst: Tensor  # 1-D view of a live tensor


class SavedIndex:
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
    """The folder of `tag` (default: the one `latest` names), a folder directly inside
    `root`; ValueError if `tag` is a path or the folder leads elsewhere."""
    if tag is None:
        tag = commit.read_latest(root)
        if tag is None:
            raise ValueError(f"no checkpoint in {root}: {root / commit.LATEST} does not exist")
    else:
        commit.check_name(tag, "tag")
    folder = root / tag
    if Path(os.path.realpath(folder)).parent != Path(os.path.realpath(root)):
        raise ValueError(f"{folder}: leads outside {root} (a symlink); tags are folders inside it")
    if not folder.is_dir():
        raise ValueError(f"{folder}: checkpoint folder does not exist")
    return folder


def _group_problems(saved: list[dict[str, Any]], opt: Any) -> list[str]:
    """Saved hyperparameters whose type does not fit the optimizer's (a number for a
    number, a bool for a bool, a list of numbers of the same length for a tuple)."""

    def num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    out = []
    for i, (group, hyper) in enumerate(zip(opt.param_groups, saved)):
        for k, v in hyper.items():
            mine = group.get(k)
            if k == "params" or mine is None or v is None:
                fits = k != "params"
            elif isinstance(mine, bool):
                fits = isinstance(v, bool)
            elif num(mine):
                fits = num(v)
            elif isinstance(mine, (tuple, list)):
                fits = isinstance(v, list) and len(v) == len(mine) and all(map(num, v))
            else:
                fits = isinstance(v, type(mine))
            if not fits:
                out.append(f"param_groups[{i}].{k} = {v!r:.40}: this optimizer holds "
                           f"{type(mine).__name__} {mine!r:.40}")  # fmt: skip
    return out


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
    for name, b in persistent_buffers(model):
        if name not in bufs or tuple(bufs[name]["shape"]) != tuple(b.shape):
            problems.append(f"buffer {name!r} missing or of another shape in the checkpoint")
    if opt is not None:
        if body.get("rule") is None:
            problems.append("the checkpoint has no optimizer state (saved without optimizer)")
        elif len(body["param_groups"]) != len(opt.param_groups):
            problems.append(f"param groups: checkpoint {len(body['param_groups'])}, "
                            f"optimizer {len(opt.param_groups)}")  # fmt: skip
        else:  # another rule or codec: converted where the states mean the same (convert.py)
            problems += convert.problems(body, opt)
        problems += _group_problems(body["param_groups"], opt)
    if problems:
        raise ValueError(f"{folder / commit.MANIFEST}: does not fit this model/optimizer: "
                         + "; ".join(problems))  # fmt: skip


def plan_reads(body: dict[str, Any], model: nn.Module, opt: Any, rank: int
               ) -> tuple[list[Read], list[convert.Convert]]:  # fmt: skip
    """The slices to read, and the state conversions to run once they are read."""
    index = SavedIndex(body)
    reads: list[Read] = []
    converts: list[convert.Convert] = []
    covered: set[str] = set()
    if opt is not None:
        lay = L.layout(opt, model)
        states = [L.shard_state(opt, i) for i in range(len(lay.groups))]
        names = sorted({k for s in states for k in s.state_names()})
        planner = convert.Planner(body, opt) if convert.needed(body, opt) else None
        if (planner is None and states and names != sorted(body["state_names"])
                and any(s.step for s in states)):  # fmt: skip
            raise ValueError(f"optimizer states: checkpoint {body['state_names']}, this run "
                             f"{names}")  # fmt: skip
        covered = {p.name for p in lay.params}
        for p, pc in lay.local_pieces():
            st = states[p.shard_group]
            dst = shard_slice(st.master, pc.shard_offset, pc.numel)
            reads += index.reads("master", "master", p.name, pc.start, dst)
            if planner is not None:  # per piece: as it is, or converted
                r, c = planner.piece(index, p.name, p.group, p.numel, pc.start,
                                     _stored(st, pc.shard_offset, pc.numel))  # fmt: skip
                reads, converts = reads + r, converts + c
                continue
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
    for name, b in persistent_buffers(model):
        fname = index.pieces[("buffer", name)][0][2]
        reads.append(Read(fname, manifest.key("buffer", name), -1, -1, b))
    return reads, converts


def _stored(st: L.ShardState, offset: int, numel: int) -> dict[str, tuple[Tensor, int]]:
    """The live stored tensors of one piece: (1-D view, parameter elements per entry)."""
    if st.pieces is not None:
        return st.pieces(offset, numel)
    return {k: (shard_slice(ts, offset, numel), 1) for k, ts in st.state.items()}


def verify_files(folder: Path, body: dict[str, Any], files: set[str],
                  reads: list[Read] | None = None) -> None:  # fmt: skip
    """Every file in `files`: confined, regular, of the manifest's size and sha256, with a
    safetensors header holding what the manifest lists (and what `reads` will take)."""
    wanted: dict[str, list[Read]] = {}
    for r in reads or []:
        wanted.setdefault(r.file, []).append(r)
    for fname in sorted(files):
        info = body["files"][fname]
        what = f"written by rank {info['rank']}"
        try:
            path = verify.inside(folder, fname)
        except ValueError as e:
            raise ValueError(f"{e} ({what})") from None
        head = verify.check_size_and_hash(path, info["size"], info["sha256"], what)
        _check_header(path, head, body, info, wanted.get(fname, []))


def _check_header(path: Path, head: dict[str, Any], body: dict[str, Any], info: dict[str, Any],
                  reads: list[Read]) -> None:  # fmt: skip
    """The file's tensors are the ones its manifest pieces name, of the right shape/dtype."""
    dtypes = {p["name"]: p["dtype"] for p in body["params"]}
    bufs = {b["name"]: b for b in body["buffers"]}
    allowed: dict[str, tuple[list[int], str | None]] = {}
    required = set()
    for kind, name, start, n in info["pieces"]:
        if kind == "buffer":
            k = manifest.key("buffer", name)
            allowed[k] = (bufs[name]["shape"], bufs[name]["dtype"])
        else:
            k = manifest.key(kind, name, start)
            allowed[k] = ([n], dtypes[name] if kind == "weight" else None)
            for s in body["state_names"] if kind == "master" else []:
                allowed[manifest.key(f"state.{s}", name, start)] = ([n], None)
        required.add(k)
    required |= {r.key for r in reads}
    extra, missing = sorted(set(head) - set(allowed)), sorted(required - set(head))
    if extra or missing:
        raise ValueError(f"{path}: holds tensors {extra[:3]} the manifest does not list for it"
                         if extra else f"{path}: lacks tensors {missing[:3]} the manifest "
                         "lists for it (piece lists swapped or the file replaced?)")  # fmt: skip
    for k, t in head.items():
        shape, dt = allowed[k]
        dt_ok = dt is None or verify.DTYPE_NAMES[t["dtype"]] == manifest.dtype_of(dt)
        # a codec's stored state (8-bit codes, per-block absmax) has at most one entry per
        # element of its piece; fp32 states and everything else match the piece exactly
        state = k.startswith("state.") and len(t["shape"]) == 1 and t["shape"][0] <= shape[0]
        if (t["shape"] != shape and not state) or not dt_ok:
            raise ValueError(f"{path}: tensor {k!r} is {t['dtype']} {t['shape']}, the manifest "
                             f"says {dt or 'float'} {shape}")  # fmt: skip
    for r in reads:  # every slice the apply step takes lies inside its tensor
        shape = head[r.key]["shape"]
        n = prod(shape)
        fits = (n == r.dst.numel() if r.lo < 0 else
                len(shape) == 1 and 0 <= r.lo <= r.hi <= n and r.hi - r.lo == r.dst.numel())
        if not fits:
            raise ValueError(f"{path}: tensor {r.key!r} of shape {shape} cannot fill the "
                             f"{r.dst.numel()} elements this rank reads from it")  # fmt: skip


class _Undo:
    """What the apply step changed, to put back if any rank fails there."""

    def __init__(self) -> None:
        self.tensors: list[tuple[Tensor, Tensor]] = []
        self.calls: list[Callable[[], None]] = []

    def restore(self) -> str:
        """Put everything back; returns what could not be (empty if all was)."""
        failed = []
        for fn in reversed(self.calls):
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - restore the rest, then report
                failed.append(f"{type(e).__name__}: {e}")
        for dst, old in reversed(self.tensors):
            dst.copy_(old)
        return "; ".join(failed)


@torch.no_grad()
def _apply(folder: Path, body: dict[str, Any], reads: list[Read],
           converts: list[convert.Convert], model: nn.Module, opt: Any, undo: _Undo
           ) -> None:  # fmt: skip
    handles: dict[str, Any] = {}
    for r in progress(reads, f"loading {folder.name}", unit="piece"):
        if r.file not in handles:
            handles[r.file] = safe_open(str(folder / r.file), framework="pt")
        f = handles[r.file]
        src = f.get_tensor(r.key) if r.lo < 0 else f.get_slice(r.key)[r.lo : r.hi]
        undo.tensors.append((r.dst, r.dst.clone()))
        r.dst.copy_(src.reshape(r.dst.shape))
    for c in converts:  # states of another stored form: (de)quantized after the reads
        undo.tensors += [(t, t.clone()) for t in c.dst]
        c.run()
    if opt is None:
        return
    lay = L.layout(opt, model)
    for g in lay.groups:
        undo.calls.append(partial(L.set_step, opt, g.index, L.shard_state(opt, g.index).step))
    old_groups = [dict(group) for group in opt.param_groups]

    def restore_groups() -> None:
        for group, old in zip(opt.param_groups, old_groups):
            group.clear()
            group.update(old)

    undo.calls.append(restore_groups)
    for obj in (opt.loss_scaler, opt.lr_scheduler):
        if obj is not None:
            undo.calls.append(partial(obj.load_state_dict, copy.deepcopy(obj.state_dict())))
    steps = {g.index: int(body["steps"].get(str(g.group), 0)) for g in lay.groups}
    # the parameters follow the master after the ranks agreed (that step is collective)
    restore_optimizer(opt, convert.restored_groups(body, opt), steps, body.get("loss_scaler"),
                      body.get("lr_scheduler"), sync=False)  # fmt: skip


def _problems(found: list[str]) -> str:
    """'rank 0, 1: <fault>' for each distinct fault the ranks reported."""
    by_msg: dict[str, list[str]] = {}
    for rank, msg in enumerate(found):
        if msg:
            by_msg.setdefault(msg, []).append(str(rank))
    return " | ".join(f"rank {', '.join(r)}: {m}" for m, r in by_msg.items())


def load_checkpoint(
    load_dir: str | os.PathLike,
    model: nn.Module,
    optimizer: Any = None,
    tag: str | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Load a checkpoint (the `latest` tag by default) at any world size and stage; call on
    every rank. A zeroshard folder or a DeepSpeed `engine.save_checkpoint` folder. Returns
    (checkpoint folder, client_state). On any fault every rank raises `CheckpointError`
    naming the file and the fault, and the model and optimizer are untouched: everything
    the load reads is checked first and the ranks agree on the verdict; should the apply
    step still fail on a rank, every rank puts back what it changed."""
    background.wait()
    dist_util.arrive("load_checkpoint")
    rank, _ = dist_util.rank_world()
    root = Path(load_dir)
    pg = dist_util.group()
    problem = ""
    folder, body, reads, converts = root, {}, [], []
    try:
        folder = resolve(root, tag)
        if not (folder / commit.MANIFEST).exists() and _looks_deepspeed(folder):
            from zeroshard.checkpoint.deepspeed_in import load_deepspeed

            return load_deepspeed(folder, model, optimizer, pg)
        body = manifest.parse(folder / commit.MANIFEST)
        _check_fit(body, model, optimizer, folder)
        reads, converts = plan_reads(body, model, optimizer, rank)
        verify_files(folder, body, {r.file for r in reads}, reads)
    except Exception as e:  # noqa: BLE001 - any fault is reported by every rank, no hang
        problem = str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}"
    found = dist_util.all_gather_obj(problem, pg)
    if any(found):
        raise commit.CheckpointError(
            f"cannot load checkpoint {folder}: {_problems(found)}. Nothing was modified."
        )
    undo, error = _Undo(), ""
    try:
        _apply(folder, body, reads, converts, model, optimizer, undo)
    except Exception as e:  # noqa: BLE001 - every rank restores, then raises
        error = f"{type(e).__name__}: {e}"
    found = dist_util.all_gather_obj(error, pg)
    if any(found):
        failed = undo.restore()
        raise commit.CheckpointError(
            f"cannot load checkpoint {folder}: applying it failed ({_problems(found)}); "
            + (f"this rank could not restore everything ({failed})" if failed else
               "every rank restored its model and optimizer to what they were")
        )  # fmt: skip
    del undo
    if optimizer is None:
        L.after_model_write(model)
    else:
        L.sync_params_from_master(optimizer)
    return folder, body["client_state"]


def _looks_deepspeed(folder: Path) -> bool:
    return any(folder.glob("*_model_states.pt"))

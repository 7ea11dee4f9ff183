"""Saving and loading whole training checkpoints, DeepSpeed-style, without ever losing one.

    save_dir/
      latest                    # the tag of the newest complete checkpoint
      <tag>/model.safetensors   # full model weights (rank 0), tied weights stored once
      <tag>/optim_rank<r>.pt    # each rank's optimizer shard, loss scaler, lr scheduler
      <tag>/client_state.pt     # whatever the caller passed as client_state (rank 0)

Every rank writes into a hidden temporary folder; only when all ranks report success does
rank 0 move it into place and point `latest` at it. A save that fails on any rank raises on
every rank and leaves the previous checkpoint (and `latest`) exactly as they were.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.distributed as dist
from torch import nn

MODEL_FILE = "model.safetensors"
LATEST = "latest"


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_ok(ok: bool) -> bool:
    """True on every rank only if `ok` is true on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    # NCCL only reduces CUDA tensors; gloo takes CPU ones
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    save_dir: str | os.PathLike,
    model: nn.Module,
    optimizer: Any,
    tag: str | None = None,
    client_state: dict[str, Any] | None = None,
) -> Path:
    """Save model weights and every rank's optimizer shard under `save_dir/tag`.

    Call on every rank. `tag` defaults to `step<N>` from the optimizer's step count.
    Returns the checkpoint folder.
    """
    rank, world = _rank_world()
    root = Path(save_dir)
    if tag is None:
        groups = optimizer.layout().groups if hasattr(optimizer, "layout") else ()
        steps = [optimizer.shard_state(g.index).step for g in groups]
        tag = f"step{max(steps, default=0)}"
    final = root / tag
    tmp = root / f".{tag}.tmp"
    error: BaseException | None = None
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        _barrier()
        # The model's state_dict may gather (stage 3), so every rank asks for it.
        state = model.state_dict()
        if rank == 0:
            safetensors.torch.save_file(_dedup_tied(state), str(tmp / MODEL_FILE))
            torch.save(client_state or {}, tmp / "client_state.pt")
        torch.save(
            {"world_size": world, "optimizer": optimizer.state_dict()},
            tmp / f"optim_rank{rank}.pt",
        )
    except BaseException as e:  # reported to every rank below, then re-raised
        error = e
    if not _all_ok(error is None):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        where = f"rank {rank}: {error!r}" if error else "another rank failed"
        raise RuntimeError(
            f"checkpoint save to {final} failed ({where}); the previous checkpoint is untouched"
        ) from error
    if rank == 0:
        old = root / f".{tag}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        _atomic_write_text(root / LATEST, tag)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _dedup_tied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One entry per distinct tensor (a tied weight appears under several names), each an
    owning contiguous copy: parameters here are views into shared flat buffers, which
    safetensors rightly refuses to write as they are."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for name, t in state.items():
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous().clone()
    return out


def load_checkpoint(
    load_dir: str | os.PathLike,
    model: nn.Module,
    optimizer: Any | None = None,
    tag: str | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Load what `save_checkpoint` wrote (the `latest` tag by default) at the same world size.
    Returns (checkpoint folder, client_state)."""
    rank, world = _rank_world()
    root = Path(load_dir)
    if tag is None:
        latest = root / LATEST
        if not latest.exists():
            raise FileNotFoundError(f"no checkpoint in {root}: {latest} does not exist")
        tag = latest.read_text().strip()
    folder = root / tag
    optim_file = folder / f"optim_rank{rank}.pt"
    if not optim_file.exists():
        raise FileNotFoundError(
            f"rank {rank}: {optim_file} does not exist (saved with fewer ranks than {world}?)"
        )
    saved = torch.load(optim_file, map_location="cpu", weights_only=False)
    if saved["world_size"] != world:
        raise ValueError(
            f"rank {rank}: checkpoint {folder} was saved by {saved['world_size']} ranks, this "
            f"run has {world}; load it at the same world size"
        )
    weights = safetensors.torch.load_file(str(folder / MODEL_FILE))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # tied weights are stored once; their other names come back through the tie itself
    tied = {n for n in missing if _is_tied_alias(model, n, weights)}
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"checkpoint {folder} does not fit this model: missing {sorted(set(missing) - tied)}"
            f", unexpected {sorted(unexpected)}"
        )
    if optimizer is not None:
        optimizer.load_state_dict(saved["optimizer"])
    client_state = torch.load(folder / "client_state.pt", weights_only=False)
    return folder, client_state


def _is_tied_alias(model: nn.Module, name: str, weights: dict[str, torch.Tensor]) -> bool:
    params = dict(model.named_parameters(remove_duplicate=False))
    target = params.get(name)
    if target is None:
        return False
    return any(params.get(other) is target for other in weights if other != name)

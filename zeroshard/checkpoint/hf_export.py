"""`zeroshard.consolidate`: a checkpoint's pieces -> Hugging Face layout safetensors.

One parameter at a time: its pieces are read (`get_slice`) from whichever rank files hold
them into one full tensor, cast, streamed into the output file and freed. Peak memory is the
largest parameter plus one saved piece in flight (measured by the returned byte counter); no
output shard is ever held whole, since the streaming writer needs only shapes for the header.
Past `max_shard_size` the output is split into `model-0000k-of-0000N.safetensors` with a
`model.safetensors.index.json`, as `save_pretrained` does.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from zeroshard.checkpoint import commit, manifest
from zeroshard.checkpoint.load import SavedIndex, resolve, verify_files
from zeroshard.checkpoint.st_stream import ByteCounter, Entry, write_file

LAST_CONSOLIDATE_STATS: dict[str, int] = {}
# client_state key under which ZeroShardTrainer saves the model's HF config (`config.to_dict()`)
HF_CONFIG_KEY = "hf_model_config"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}  # fmt: skip


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]*)\s*", size)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"max_shard_size: cannot read {size!r} (use e.g. '5GB' or bytes)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _folder(ckpt_dir: Path, tag: str | None) -> Path:
    if tag is None and (ckpt_dir / commit.MANIFEST).exists():
        return ckpt_dir
    return resolve(ckpt_dir, tag)


def consolidate(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    tag: str | None = None,
    hf_config: str | os.PathLike | Mapping[str, Any] | None = None,
) -> Path:
    """Write `out_dir/model.safetensors` (or sharded files + index) from a zeroshard
    checkpoint folder (or its parent with `latest`). Weights come from the fp32 master where
    saved, cast to `dtype` (default: each parameter's model dtype). Runs in one process.

    `out_dir/config.json` is written too when the model's Hugging Face config is known:
    `hf_config` (a dict, a config.json, or a folder holding one), else the one
    `ZeroShardTrainer` stores in its checkpoints; `from_pretrained(out_dir)` then loads it."""
    folder = _folder(Path(ckpt_dir), tag)
    body = manifest.parse(folder / commit.MANIFEST)
    model_config = _model_config(hf_config, body.get("client_state") or {})
    verify_files(folder, body, set(body["files"]))
    index = SavedIndex(body)
    items: list[tuple[str, tuple[int, ...], torch.dtype, str]] = []
    for p in body["params"]:
        kind = "master" if ("master", p["name"]) in index.pieces else "weight"
        items.append((p["name"], tuple(p["shape"]), dtype or manifest.dtype_of(p["dtype"]), kind))
    for b in body["buffers"]:
        items.append((b["name"], tuple(b["shape"]), manifest.dtype_of(b["dtype"]), "buffer"))
    limit = parse_size(max_shard_size)
    shards: list[list[tuple]] = [[]]
    filled = 0
    for it in items:
        n = _numel(it[1]) * torch.empty((), dtype=it[2]).element_size()
        if shards[-1] and filled + n > limit:
            shards.append([])
            filled = 0
        shards[-1].append(it)
        filled += n
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counter = ByteCounter()
    handles: dict[str, Any] = {}
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards):
        fname = (
            "model.safetensors" if len(shards) == 1
            else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        )  # fmt: skip
        entries = [Entry(name, shape, dt, _maker(folder, index, handles, counter, name, shape,
                                                   dt, kind))
                   for name, shape, dt, kind in shard]  # fmt: skip
        _, size = write_file(out / fname, entries, {"format": "pt"}, counter,
                             desc=f"consolidating {fname}")  # fmt: skip
        total += size
        weight_map.update({name: fname for name, *_ in shard})
    if len(shards) > 1:
        idx = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(idx, indent=2))
    if model_config is not None:
        (out / "config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True))
    LAST_CONSOLIDATE_STATS.update(peak_bytes=counter.peak, shards=len(shards))
    return out


def _model_config(given: Any, client_state: Mapping[str, Any]) -> dict[str, Any] | None:
    """The model's HF config: `given` (dict, file or folder), else the checkpoint's."""
    if given is None:
        found = client_state.get(HF_CONFIG_KEY)
        return dict(found) if isinstance(found, Mapping) else None
    if isinstance(given, Mapping):
        return dict(given)
    path = Path(given)
    if path.is_dir():
        path = path / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"hf_config: {path} does not exist") from None
    except ValueError as e:
        raise ValueError(f"hf_config: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"hf_config: {path} must hold a JSON object")
    return data


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _maker(folder: Path, index: SavedIndex, handles: dict, counter: ByteCounter, name: str,
           shape: tuple[int, ...], dtype: torch.dtype, kind: str):  # fmt: skip
    def make() -> torch.Tensor:
        def f(fname: str) -> Any:
            if fname not in handles:
                handles[fname] = safe_open(str(folder / fname), framework="pt")
            return handles[fname]

        if kind == "buffer":
            fname = index.pieces[("buffer", name)][0][2]
            return f(fname).get_tensor(manifest.key("buffer", name)).to(dtype)
        full = torch.empty(_numel(shape), dtype=dtype)
        counter.add(full.numel() * full.element_size())  # (the writer counts it again next)
        for r in index.reads(kind, kind, name, 0, full):
            src = f(r.file).get_slice(r.key)[r.lo : r.hi]
            n = src.numel() * src.element_size()
            counter.add(n)
            r.dst.copy_(src)
            del src
            counter.sub(n)
        counter.sub(full.numel() * full.element_size())
        return full.view(shape)

    return make

"""Reading checkpoint files without trusting them: confined, bounded, checked before use.

A manifest's own checksum only detects accidents (anyone can recompute it), so every file a
load reads is checked here before anything is modified:
- its name is a plain name inside the checkpoint folder, and the path resolves inside that
  folder to a regular file (no `..`, absolute paths, symlinks leaving it, devices or FIFOs);
- its size equals the manifest's before anything is read, and the sha256 covers exactly
  that many bytes (a file that grows while read cannot make the hash read forever);
- a safetensors header is bounded (100 MB, as safetensors itself) and well formed: known
  dtypes, shapes that match the byte ranges, ranges that tile the data section exactly; so
  `safe_open` cannot fail on it afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from pathlib import Path
from typing import Any

import torch

from zeroshard.checkpoint.st_stream import DTYPE_NAMES

MAX_HEADER = 100 * 1024 * 1024  # safetensors refuses larger headers too
BLOCK = 1 << 22


def inside(folder: Path, name: str) -> Path:
    """`folder/name` if `name` is a plain name resolving to a regular file in `folder`."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"{folder}: file name {name!r} is not a name inside the folder")
    path = folder / name
    real = Path(os.path.realpath(path))
    if real.parent != Path(os.path.realpath(folder)):
        raise ValueError(f"{path}: a symlink leading outside the checkpoint folder ({real})")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise ValueError(f"{path}: missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: not a regular file (a device, FIFO or folder)")
    return path


def read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of the regular file `path`, refusing files over `limit` bytes."""
    path = inside(path.parent, path.name)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise ValueError(f"{path}: {size} bytes, more than the {limit} this file may hold")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path}: grew past {limit} bytes while read")
    return data


def check_size_and_hash(path: Path, size: int, sha256: str, what: str) -> dict[str, Any]:
    """Check `path` (already `inside`) is `size` bytes with that sha256, reading at most
    `size` bytes; returns its safetensors header (tensor key -> {dtype, shape, ...})."""
    actual = os.stat(path).st_size
    if actual != size:
        raise ValueError(f"{path}: size {actual} bytes, manifest says {size} "
                         f"(truncated or overwritten; {what})")  # fmt: skip
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size != size:
            raise ValueError(f"{path}: changed size while opened")
        header = _header(f, path, size)
        f.seek(0)
        h, left = hashlib.sha256(), size
        while left:
            chunk = f.read(min(BLOCK, left))
            if not chunk:
                raise ValueError(f"{path}: ended {left} bytes early while hashed (truncated)")
            h.update(chunk)
            left -= len(chunk)
    if h.hexdigest() != sha256:
        raise ValueError(f"{path}: sha256 mismatch (the file is corrupted; {what})")
    return header


def _header(f: Any, path: Path, size: int) -> dict[str, Any]:
    """The safetensors header of the open file `f` of `size` bytes, validated."""
    if size < 8:
        raise ValueError(f"{path}: {size} bytes, too short for a safetensors file")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > MAX_HEADER or 8 + n > size:
        raise ValueError(f"{path}: safetensors header of {n} bytes (file {size} bytes, "
                         f"limit {MAX_HEADER}): not a valid safetensors file")  # fmt: skip
    try:
        head = json.loads(f.read(n))
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path}: unreadable safetensors header ({type(e).__name__})") from None
    if not isinstance(head, dict):
        raise ValueError(f"{path}: safetensors header is not a JSON object")
    head.pop("__metadata__", None)
    spans = []
    for key, t in head.items():
        ok = (isinstance(t, dict) and t.get("dtype") in DTYPE_NAMES
              and isinstance(t.get("shape"), list) and isinstance(t.get("data_offsets"), list)
              and all(type(d) is int and d >= 0 for d in t["shape"] + t["data_offsets"])
              and len(t["data_offsets"]) == 2)  # fmt: skip
        if not ok:
            raise ValueError(f"{path}: tensor {key!r} has a malformed safetensors entry")
        a, z = t["data_offsets"]
        numel = 1
        for d in t["shape"]:
            numel *= d
        itemsize = torch.empty((), dtype=DTYPE_NAMES[t["dtype"]]).element_size()
        if z - a != numel * itemsize:
            raise ValueError(f"{path}: tensor {key!r}: byte range {a}..{z} does not hold "
                             f"shape {t['shape']} of {t['dtype']}")  # fmt: skip
        spans.append((a, z, key))
    pos = 0
    for a, z, key in sorted(spans):
        if a != pos:
            raise ValueError(f"{path}: tensor {key!r} starts at byte {a}, expected {pos} "
                             "(overlapping or gapped data)")  # fmt: skip
        pos = z
    if pos != size - 8 - n:
        raise ValueError(f"{path}: tensors end at byte {pos} of a {size - 8 - n}-byte data "
                         "section")  # fmt: skip
    return head

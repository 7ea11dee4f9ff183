"""Safetensors files written one tensor (slice) at a time, hashed as they are written.

`safetensors.torch.save_file` serialises the whole dict into one buffer first (a second copy
of everything it writes); here the header is computed from shapes alone and each tensor's
bytes are streamed in slices of at most `slice_numel` elements, so the bytes a save adds on
top of what the rank already holds stay at one slice (one CPU copy, for device tensors).
Readers are plain `safetensors.safe_open`.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from zeroshard.timing import progress

DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
DEFAULT_SLICE = 1 << 22  # elements per write: bounds the extra bytes of a device->CPU copy


@dataclass
class ByteCounter:
    """Bytes of tensors a save materialised (copies it made), now and at peak."""

    current: int = 0
    peak: int = 0

    def add(self, n: int) -> None:
        self.current += n
        self.peak = max(self.peak, self.current)

    def sub(self, n: int) -> None:
        self.current -= n


Source = Tensor | Callable[[], Tensor]


@dataclass
class Entry:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    source: Source  # a tensor (viewed, never copied on CPU) or a function making one


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _header(entries: list[Entry], metadata: dict[str, str]) -> bytes:
    head: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for e in entries:
        n = 1
        for d in e.shape:
            n *= d
        nbytes = n * torch.empty((), dtype=e.dtype).element_size()
        head[e.key] = {"dtype": DTYPES[e.dtype], "shape": list(e.shape),
                       "data_offsets": [offset, offset + nbytes]}  # fmt: skip
        offset += nbytes
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_file(
    path: Path,
    entries: list[Entry],
    metadata: dict[str, str] | None = None,
    counter: ByteCounter | None = None,
    slice_numel: int = DEFAULT_SLICE,
    desc: str | None = None,
) -> tuple[str, int]:
    """Write `entries` to `path` (fsynced); returns (sha256 hex, size in bytes). With `desc`,
    a progress bar in tensors written (rank 0, long writes only)."""
    counter = counter or ByteCounter()
    h = hashlib.sha256()
    size = 0
    with open(path, "wb") as f:
        head = _header(entries, metadata or {})
        f.write(head)
        h.update(head)
        size += len(head)
        for e in entries if desc is None else progress(entries, desc, unit="tensor"):
            src = e.source() if callable(e.source) else e.source
            made = 0 if not callable(e.source) else src.numel() * src.element_size()
            if not src.is_contiguous():
                src = src.contiguous()
                made += src.numel() * src.element_size()
            counter.add(made)
            flat = src.detach().reshape(-1)
            for lo in range(0, max(src.numel(), 1), slice_numel):
                part = flat[lo : lo + slice_numel]
                extra = 0
                if part.device.type != "cpu":
                    part = part.cpu()
                    extra = part.numel() * part.element_size()
                counter.add(extra)
                buf = memoryview(part.view(torch.uint8).numpy()) if part.numel() else b""
                f.write(buf)
                h.update(buf)
                size += len(buf)
                counter.sub(extra)
            counter.sub(made)
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest(), size


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()

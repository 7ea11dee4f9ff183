"""The checkpoint manifest: JSON, self-checksummed, describing every file and tensor piece.

    <tag>/manifest.json         {"sha256": <of the canonical body>, "body": {...}}
    <tag>/rank00000.safetensors one per saving rank: its pieces, keyed by name and offset

Body fields: format, version, world_size, stage, rule, params [{name, shape, dtype,
trainable, group}], buffers [{name, shape, dtype}], param_groups (hyperparameters),
steps {group: step}, state_names, loss_scaler, lr_scheduler, client_state, files
{name: {rank, size, sha256, pieces: [[kind, param, start, numel], ...]}}.
Piece kinds: "master" (fp32 master, plus one tensor per optimizer state), "weight" (a
parameter the optimizer does not hold, in its own dtype), "buffer" (whole).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

FORMAT = "zeroshard-universal"
VERSION = 2


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.safetensors"


def key(kind: str, name: str, start: int = 0) -> str:
    """Tensor key in a rank file: `master/<param>@<start>`, `state.<s>/<param>@<start>`..."""
    return f"{kind}/{name}@{start}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    return getattr(torch, name)


def to_json(obj: Any, what: str) -> Any:
    """`obj` as JSON-able data, or a ValueError naming `what` and the offending key path."""

    def conv(x: Any, path: str) -> Any:
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, (list, tuple)):
            return [conv(v, f"{path}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, dict):
            out = {}
            for k, v in x.items():
                if not isinstance(k, (str, int)):
                    raise ValueError(f"{what}: key {k!r} at {path or '<root>'} is not a string")
                out[str(k)] = conv(v, f"{path}.{k}" if path else str(k))
            return out
        if torch.is_tensor(x) and x.numel() == 1:
            return x.item()
        raise ValueError(
            f"{what} must be JSON data (dict/list/str/int/float/bool/None); {path or '<root>'}"
            f" is a {type(x).__name__}. Save tensors with the model, or convert them first."
        )

    return conv(obj, "")


def render(body: dict[str, Any]) -> str:
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canon.encode()).hexdigest()
    return json.dumps({"sha256": digest, "body": body}, sort_keys=True, indent=1)


def parse(path: Path) -> dict[str, Any]:
    """The manifest body; ValueError naming the file on any fault."""
    if not path.exists():
        raise ValueError(f"{path}: missing (not a complete zeroshard checkpoint)")
    try:
        outer = json.loads(path.read_text())
        body = outer["body"]
        canon = json.dumps(body, sort_keys=True, separators=(",", ":"))
        ok = hashlib.sha256(canon.encode()).hexdigest() == outer["sha256"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: unreadable manifest ({e})") from None
    if not ok:
        raise ValueError(f"{path}: checksum mismatch (the manifest is corrupted)")
    if body.get("format") != FORMAT or body.get("version") != VERSION:
        raise ValueError(
            f"{path}: format {body.get('format')!r} version {body.get('version')!r}, "
            f"this zeroshard reads {FORMAT!r} version {VERSION}"
        )
    return body

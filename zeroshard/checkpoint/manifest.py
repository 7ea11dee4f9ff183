"""The checkpoint manifest: JSON, self-checksummed, describing every file and tensor piece.

    <tag>/manifest.json         {"sha256": <of the canonical body>, "body": {...}}
    <tag>/rank00000.safetensors one per saving rank: its pieces, keyed by name and offset

Body fields: format, version, world_size, stage, rule, params [{name, shape, dtype,
trainable, group}], buffers [{name, shape, dtype}], param_groups (hyperparameters; an
AdamW8bit group's block_size and min_8bit_size among them), steps {group: step},
state_names, state_codec (None: fp32 states), loss_scaler, lr_scheduler, client_state, files
{name: {rank, size, sha256, pieces: [[kind, param, start, numel], ...]}}.
Piece kinds: "master" (fp32 master, plus one tensor per optimizer state), "weight" (a
parameter the optimizer does not hold, in its own dtype), "buffer" (whole).
"""

# pydantic evaluates field annotations at runtime, and `X | Y` fails there on Python 3.9
# (still supported by setup.py), so the schema keeps Optional.
# ruff: noqa: UP045

from __future__ import annotations

import hashlib
import json
from math import prod
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
)

from zeroshard.checkpoint import verify
from zeroshard.checkpoint.st_stream import DTYPES

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
    """The torch dtype a manifest names (only the dtypes checkpoints hold)."""
    for d in DTYPES:
        if dtype_name(d) == name:
            return d
    raise ValueError(f"unknown dtype {name!r}")


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


MAX_BYTES = 1 << 30  # a manifest is metadata: a larger one is not ours


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


NonNeg = Annotated[StrictInt, Field(ge=0)]
DType = Literal[tuple(dtype_name(d) for d in DTYPES)]  # type: ignore[valid-type]
FileName = Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}$")]


class FileInfo(_Strict):
    rank: NonNeg
    size: NonNeg
    sha256: Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$")]
    pieces: list[tuple[Literal["master", "weight", "buffer"], StrictStr, NonNeg, NonNeg]]


class ParamInfo(_Strict):
    name: StrictStr
    shape: list[NonNeg]
    dtype: DType
    trainable: StrictBool
    group: Optional[NonNeg] = None  # its optimizer param group (None: not held by one)


class BufferInfo(_Strict):
    name: StrictStr
    shape: list[NonNeg]
    dtype: DType


class Body(_Strict):
    """The manifest body's schema: every field a load reads, with its type."""

    format: Literal["zeroshard-universal"]
    version: Literal[2]
    world_size: Annotated[StrictInt, Field(ge=1)]
    stage: Optional[Annotated[StrictInt, Field(ge=0, le=3)]]
    rule: Optional[StrictStr]
    params: list[ParamInfo]
    buffers: list[BufferInfo]
    param_groups: list[dict[StrictStr, Any]]
    steps: dict[Annotated[StrictStr, Field(pattern=r"^[0-9]{1,9}$")], NonNeg]
    state_names: list[Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_]{1,64}$")]]
    state_codec: Optional[dict[StrictStr, Any]] = None  # how states are stored (None: fp32)
    loss_scaler: Optional[dict[StrictStr, Any]]
    lr_scheduler: Optional[dict[StrictStr, Any]]
    client_state: Any
    files: dict[FileName, FileInfo]


def _schema_errors(e: ValidationError) -> str:
    out = []
    for err in e.errors(include_url=False)[:5]:
        shown = json.dumps(err.get("input"), default=repr)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        if err["loc"][:1] == ("files",) and err["loc"][-1] == "[key]":
            out.append(
                f"body.files names the file {shown}: not a plain name inside the "
                "checkpoint folder (no '/', '..', absolute path or leading '.')"
            )
            continue
        loc = ".".join(str(x) for x in err["loc"]) or "<body>"
        out.append(f"body.{loc} = {shown}: {err['msg']}")
    more = e.error_count() - len(out)
    return "; ".join(out) + (f" (and {more} more)" if more > 0 else "")


def _consistent(body: dict[str, Any]) -> None:
    """Pieces name saved tensors, lie inside them and do not overlap; ValueError if not."""
    numel = {p["name"]: prod(p["shape"]) for p in body["params"]}
    bufs = {b["name"]: prod(b["shape"]) for b in body["buffers"]}
    seen: dict[tuple[str, str], list[tuple[int, int, str]]] = {}
    for fname, info in body["files"].items():
        for kind, name, start, n in info["pieces"]:
            size = (bufs if kind == "buffer" else numel).get(name)
            where = f"files.{fname}.pieces [{kind!r}, {name!r}, {start}, {n}]"
            if size is None:
                raise ValueError(f"{where}: the manifest lists no such tensor")
            if start + n > size or (kind == "buffer" and (start, n) != (0, size)):
                raise ValueError(f"{where}: outside the tensor's {size} elements")
            seen.setdefault((kind, name), []).append((start, start + n, fname))
    for (kind, name), spans in seen.items():
        spans.sort()
        for (a0, z0, f0), (a1, _, f1) in zip(spans, spans[1:]):
            if a1 < z0:
                raise ValueError(f"{kind} pieces of {name!r} overlap ({f0} [{a0}, {z0}) and "
                                 f"{f1} from {a1})")  # fmt: skip


def parse(path: Path) -> dict[str, Any]:
    """The manifest body, checked against the schema; ValueError naming the file on any
    fault. The checksum detects accidental damage only: it is not authentication."""
    if not path.exists() and not path.is_symlink():
        raise ValueError(f"{path}: missing (not a complete zeroshard checkpoint)")
    raw = verify.read_bounded(path, MAX_BYTES)
    try:
        outer = json.loads(raw)
        body = outer["body"]
        canon = json.dumps(body, sort_keys=True, separators=(",", ":"))
        ok = hashlib.sha256(canon.encode()).hexdigest() == outer["sha256"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: unreadable manifest ({type(e).__name__}: {e})") from None
    if not ok:
        raise ValueError(f"{path}: checksum mismatch (the manifest is corrupted)")
    if not isinstance(body, dict) or body.get("format") != FORMAT or body.get("version") != VERSION:
        got = body if not isinstance(body, dict) else (body.get("format"), body.get("version"))
        raise ValueError(f"{path}: format/version {got!r}, this zeroshard reads {FORMAT!r} "
                         f"version {VERSION}")  # fmt: skip
    try:
        Body.model_validate(body)
        _consistent(body)
    except ValidationError as e:
        raise ValueError(f"{path}: malformed manifest: {_schema_errors(e)}") from None
    except ValueError as e:
        raise ValueError(f"{path}: malformed manifest: {e}") from None
    return body

"""ZeRO config keys zeroshard cannot honour as DeepSpeed defines them are rejected by name
(nothing is accepted and silently ignored), and DeepSpeed's / HF's spelling of "no
offload" (`{"device": "none"}`) is accepted as what it says; offload to the host is checked
against the stage here, and NVMe is refused by name."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

_OFFLOAD_KEYS = ("offload_optimizer", "offload_param")

# (key, value that cannot be honoured, why, minimum stage the key matters at)
_ALWAYS = (
    ("contiguous_gradients", False,
     "zeroshard always keeps gradients in contiguous flat buffers", 0),
    ("load_from_fp32_weights", False,
     "zeroshard always restores the fp32 master weights saved in its checkpoints", 0),
    ("stage3_gather_16bit_weights_on_model_save", False,
     "a stage-3 model's state_dict() always gathers the full weights in zeroshard", 3),
    ("overlap_comm", False,
     "at stage 3 zeroshard always overlaps the gradient reduce-scatter with backward", 3),
)  # fmt: skip


def drop_no_offload(data: Any) -> Any:
    """`offload_*: {"device": "none"}` means no offload (DeepSpeed, HF templates): drop it."""
    if not isinstance(data, Mapping):
        return data
    data = dict(data)
    for key in _OFFLOAD_KEYS:
        value = data.get(key)
        if isinstance(value, Mapping) and value.get("device") == "none":
            del data[key]  # "cpu" offloads; anything else fails validation with the key path
    return data


def check_offload_device(key: str, data: Any) -> Any:
    """Before an offload section is read: its device is "cpu" ("none" was dropped already);
    NVMe is named, whatever other keys came with it."""
    device = data.get("device") if isinstance(data, Mapping) else None
    if device == "nvme":
        raise ValueError(
            f'`zero_optimization.{key}.device` = "nvme" is not supported by zeroshard yet '
            '(offload to NVMe is not built); use "cpu", or "none" for no offload'
        )
    if isinstance(data, Mapping) and "device" in data and device != "cpu":
        raise ValueError(
            f"`zero_optimization.{key}.device` = {json.dumps(device)}: must be "
            '"cpu" (host memory) or "none" (no offload)'
        )
    return data


def check_honoured(zo: Any) -> Any:
    """After validation: keys given with a value zeroshard does not implement."""
    given = zo.model_fields_set
    problems = []
    for key, bad, why, min_stage in _ALWAYS:
        if key in given and getattr(zo, key) == bad and zo.stage >= min_stage:
            problems.append(
                f"`zero_optimization.{key}` = {json.dumps(bad)} is not supported: {why}; "
                "remove the key or set it to true"
            )
    problems += _offload_problems(zo)
    if problems:
        raise ValueError("; ".join(problems))
    return zo


def _offload_problems(zo: Any) -> list[str]:
    """Offload to the host at the stages it is built for; NVMe is refused by name."""
    out = []
    if zo.offload_optimizer is not None and zo.stage == 0:
        out.append(
            "`zero_optimization.offload_optimizer` needs stage 1, 2 or 3 (stage is 0: "
            "nothing is sharded); raise the stage or remove the key"
        )
    if zo.offload_param is not None:
        if zo.stage != 3:
            out.append(
                f"`zero_optimization.offload_param` is a stage-3 option (stage is {zo.stage}): "
                "only stage 3 partitions parameters; remove the key or use stage 3"
            )
        elif zo.offload_optimizer is None:
            out.append(
                "`zero_optimization.offload_param` needs `zero_optimization.offload_optimizer` "
                '= {"device": "cpu"} too: the update runs where the parameter shards live'
            )
    return out


def stage3_bucket_numel(zo: Any) -> int:
    """Stage 3 cuts each unit into buckets of at most `reduce_bucket_size` elements, the
    key's meaning at every stage: the most gradient elements one reduction covers (a stage-3
    bucket is also the unit of its parameters' all-gather)."""
    return int(zo.reduce_bucket_size)

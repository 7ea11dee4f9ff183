"""ZeRO config keys zeroshard cannot honour as DeepSpeed defines them are rejected by name
(issue 8: nothing accepted and silently ignored), and DeepSpeed's / HF's spelling of "no
offload" (`{"device": "none"}`) is accepted as what it says."""

from __future__ import annotations

import difflib
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


# The keys DeepSpeed's offload sections define: with `"device": "none"` they are inert, but a
# key outside these is a typo (`nvme_pathh`) that must not vanish with the section.
_OFFLOAD_FIELDS = {
    "offload_param": ("device", "nvme_path", "buffer_count", "buffer_size", "max_in_cpu",
                      "pin_memory"),
    "offload_optimizer": ("device", "nvme_path", "buffer_count", "pin_memory", "pipeline_read",
                          "pipeline_write", "fast_init", "ratio", "super_offload",
                          "cpuadam_cores_perc"),
}  # fmt: skip


def drop_no_offload(data: Any) -> Any:
    """`offload_*: {"device": "none"}` means no offload (DeepSpeed, HF templates): drop it,
    after checking its other keys are DeepSpeed's."""
    if not isinstance(data, Mapping):
        return data
    data = dict(data)
    for key in _OFFLOAD_KEYS:
        value = data.get(key)
        if isinstance(value, Mapping) and value.get("device") == "none":
            allowed = _OFFLOAD_FIELDS[key]
            for k in value:
                if k not in allowed:
                    guess = difflib.get_close_matches(str(k), allowed, n=1)
                    hint = f"; did you mean `zero_optimization.{key}.{guess[0]}`?" if guess else ""
                    raise ValueError(f"`zero_optimization.{key}.{k}` is an unknown key{hint}; "
                                     f"allowed keys in `zero_optimization.{key}`: "
                                     f"{', '.join(allowed)}")  # fmt: skip
            del data[key]  # any other value is rejected by name as an unsupported option
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
    if problems:
        raise ValueError("; ".join(problems))
    return zo


def stage3_bucket_numel(zo: Any) -> int:
    """Stage 3 cuts each unit into buckets that are both its all-gathers and its
    reduce-scatters: a `reduce_bucket_size` given in the config bounds them too."""
    numel = int(zo.allgather_bucket_size)
    if "reduce_bucket_size" in zo.model_fields_set and isinstance(zo.reduce_bucket_size, int):
        numel = min(numel, zo.reduce_bucket_size)
    return numel

"""What config values mean beyond their schema, each rule written once:

- ZeRO keys zeroshard cannot honour as DeepSpeed defines them are rejected by name (nothing is
  accepted and silently ignored), and DeepSpeed's / HF's "no offload" (`{"device": "none"}`)
  is accepted as what it says; offload to the host is checked against the stage, and NVMe is
  refused by name;
- `"auto"`: which keys may hold it, what each becomes and where from (the model's hidden
  size, or the Trainer's arguments as in HF's DeepSpeed integration). The config's
  `resolve_auto`, `zeroshard check-config` and the HF integration all read these tables;
- the model's hidden size, for the "auto" bucket sizes.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from zeroshard.config.errors import ConfigError

# the ZeRO++ rules live in zeropp.py; check_zeropp_topology is re-exported: the runtime and
# check-config read the rules of a config's values from here
from zeroshard.config.zeropp import check_zeropp_topology as check_zeropp_topology
from zeroshard.config.zeropp import zeropp_problems

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
                          "cpuadam_cores_perc", "threads"),
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
    problems += zeropp_problems(zo)  # stage 3 only; qgZ needs reduce_scatter
    if zo.overlap_param_gather and zo.stage in (0, 3):
        why = ("stage 0 updates every parameter on every rank: there is no parameter gather"
               if zo.stage == 0 else "stage 3 always gathers parameters ahead of use "
               "(`stage3_prefetch_bucket_size`)")  # fmt: skip
        problems.append(f"`zero_optimization.overlap_param_gather` = true applies to stages 1 "
                        f"and 2 (stage is {zo.stage}): {why}; remove the key")
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


# -- "auto" ------------------------------------------------------------------------------------
# key -> (rule as text, value from the hidden size h): HF's `trainer_config_finalize`
HIDDEN_SIZE_AUTOS: dict[str, tuple[str, Callable[[int], int]]] = {
    "zero_optimization.reduce_bucket_size": ("hidden_size * hidden_size", lambda h: h * h),
    "zero_optimization.stage3_prefetch_bucket_size":
        ("0.9 * hidden_size * hidden_size", lambda h: int(0.9 * h * h)),
    "zero_optimization.stage3_param_persistence_threshold":
        ("10 * hidden_size", lambda h: 10 * h),
}  # fmt: skip

# the batch sizes: "auto" ones are derived from the others and the world size (DeepSpeed's rule)
BATCH_AUTOS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _warmup_steps(args: Any, steps: int) -> int:
    """HF's `TrainingArguments.get_warmup_steps` (warmup_steps wins over warmup_ratio), kept
    positive as HF does (DeepSpeed >= 0.19.6 rejects 0 warmup steps)."""
    get = getattr(args, "get_warmup_steps", None)
    if callable(get):
        return max(1, int(get(steps)))
    n = getattr(args, "warmup_steps", 0) or 0
    if n >= 1:
        return int(n)
    return max(1, math.ceil(steps * (n or getattr(args, "warmup_ratio", 0.0) or 0.0)))


def _world(args: Any) -> int:
    return int(getattr(args, "world_size", 1))


# key -> (the TrainingArguments it comes from, its value from (args, num_training_steps)):
# HF's `trainer_config_process` / `trainer_config_finalize`. "auto" in any of these is
# filled from the Trainer; ZeroShardTrainer also fills them when the config leaves them out.
TRAINER_AUTOS: dict[str, tuple[str, Callable[[Any, int], Any]]] = {
    "train_micro_batch_size_per_gpu":
        ("per_device_train_batch_size", lambda a, n: int(a.per_device_train_batch_size)),
    "gradient_accumulation_steps":
        ("gradient_accumulation_steps", lambda a, n: int(a.gradient_accumulation_steps)),
    "train_batch_size": (
        "world_size * per_device_train_batch_size * gradient_accumulation_steps",
        lambda a, n: _world(a) * int(a.per_device_train_batch_size)
        * int(a.gradient_accumulation_steps),
    ),
    "gradient_clipping": ("max_grad_norm", lambda a, n: a.max_grad_norm),
    "optimizer.params.lr": ("learning_rate", lambda a, n: a.learning_rate),
    "optimizer.params.betas": ("adam_beta1, adam_beta2", lambda a, n: [a.adam_beta1, a.adam_beta2]),
    "optimizer.params.eps": ("adam_epsilon", lambda a, n: a.adam_epsilon),
    "optimizer.params.weight_decay": ("weight_decay", lambda a, n: a.weight_decay),
    "scheduler.params.warmup_min_lr": ("0", lambda a, n: 0),
    "scheduler.params.warmup_max_lr": ("learning_rate", lambda a, n: a.learning_rate),
    "scheduler.params.warmup_num_steps": ("warmup_steps or warmup_ratio", _warmup_steps),
    "scheduler.params.total_num_steps": ("max_steps (the number of training steps)",
                                         lambda a, n: n),
    "fp16.enabled": ("fp16", lambda a, n: bool(getattr(a, "fp16", False)
                                               or getattr(a, "fp16_full_eval", False))),
    "bf16.enabled": ("bf16", lambda a, n: bool(getattr(a, "bf16", False)
                                               or getattr(a, "bf16_full_eval", False))),
}  # fmt: skip
# filled only where "auto": the Trainer cannot know better than a number the config gives
TRAINER_FILL_ONLY = frozenset({"scheduler.params.warmup_min_lr"})


def hidden_size_autos(autos: list[str], hidden_size: int | None) -> dict[str, int]:
    """The values of the "auto" hidden-size keys `autos` (dotted paths) for `hidden_size`;
    a ConfigError naming each of them when the hidden size is unknown."""
    if not autos:
        return {}
    if hidden_size is None or isinstance(hidden_size, bool) or hidden_size < 1:
        raise ConfigError([
            f'`{k}` is "auto" but the model\'s hidden size is unknown (got '
            f"hidden_size={hidden_size!r}: no config.hidden_size, n_embd, d_model or dim); "
            "give a number in the config or pass hidden_size"
            for k in autos
        ])  # fmt: skip
    return {k: HIDDEN_SIZE_AUTOS[k][1](hidden_size) for k in autos}


def hidden_size_of(model: Any) -> int | None:
    """The model's hidden size if it says so: what "auto" bucket sizes are derived from.
    HF `config.hidden_size` (or max of `hidden_sizes`, or the same under `text_config`),
    else GPT-style `n_embd`, `d_model` or `dim` on the config or the model itself."""
    cfg = getattr(model, "config", None)
    for owner in (cfg, getattr(cfg, "text_config", None), model):
        if owner is None:
            continue
        sizes = getattr(owner, "hidden_sizes", None)
        for value in (getattr(owner, "hidden_size", None), max(sizes) if sizes else None,
                      getattr(owner, "n_embd", None), getattr(owner, "d_model", None),
                      getattr(owner, "dim", None)):  # fmt: skip
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None

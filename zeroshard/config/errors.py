"""Error reporting for :mod:`zeroshard.config.schema`.

Kept apart from the schema so that the models stay readable. Everything here exists to turn
pydantic's machine-oriented errors into one message a DeepSpeed user can act on: the full key
path, the offending value, what is allowed, and a "did you mean" for typos.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

__all__ = ["ConfigError", "DEEPSPEED_UNSUPPORTED", "format_path", "translate_validation_error"]


class ConfigError(ValueError):
    """Raised for every problem found in a zeroshard/DeepSpeed JSON config.

    Subclasses ValueError so callers that already catch ValueError for bad arguments keep working.
    ``problems`` holds one human-readable line per problem (the message joins them).
    """

    def __init__(self, problems: str | Sequence[str], *, source: str | None = None) -> None:
        self.problems: list[str] = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        if len(self.problems) == 1:
            message = f"invalid zeroshard config{where}: {self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            message = f"invalid zeroshard config{where} ({len(self.problems)} problems):\n{lines}"
        super().__init__(message)


# DeepSpeed options we know about but do not implement, by section ("" = top level). Rejecting
# them by name (instead of as "unknown key") tells the user the config is valid DeepSpeed and
# that ignoring the option silently would change their training.
DEEPSPEED_UNSUPPORTED: dict[str, frozenset[str]] = {
    "": frozenset(
        {
            "activation_checkpointing",
            "flops_profiler",
            "tensorboard",
            "wandb",
            "csv_monitor",
            "comet",
            "amp",
            "pipeline",
            "elasticity",
            "autotuning",
            "aio",
            "compression_training",
            "data_efficiency",
            "sparse_attention",
            "curriculum_learning",
            "comms_logger",
            "checkpoint",
            "data_types",
            "zero_allow_untested_optimizer",
            "zero_force_ds_cpu_optimizer",
            "prescale_gradients",
            "gradient_predivide_factor",
            "sparse_gradients",
            "dump_state",
            "memory_breakdown",
            "fp32_allreduce",
            "disable_allgather",
            "dataloader_drop_last",
            "eigenvalue",
            "progressive_layer_drop",
            "quantize_training",
            "hybrid_engine",
            "nebula",
            "weight_quantization",
            "compile",
            "timers",
            "torch_autocast",
            "tensor_parallel",
            "seq_parallel_communication_data_type",
            "graph_harvesting",
            "use_data_before_expert_parallelism",
            "monitor_config",
        }
    ),
    "zero_optimization": frozenset(
        {
            "zeropp_loco_param",  # LoCo-ZeRO++ (removed from DeepSpeed in 0.19)
            "mics_shard_size",
            "mics_hierarchical_params_gather",
            "ignore_unused_parameters",
            "round_robin_gradients",
            "elastic_checkpoint",
            "sub_group_size",
            "cpu_offload",
            "cpu_offload_param",
            "cpu_offload_use_pin_memory",
            "legacy_stage1",
            "memory_efficient_linear",
            "pipeline_loading_checkpoint",
            "override_module_apply",
            "stage3_model_persistence_threshold",
            "stage3_module_granularity_threshold",
            "stage3_use_all_reduce_for_fetch_params",
            "use_multi_rank_bucket_allreduce",
            "log_trace_cache_warnings",
            "stage3_gather_fp16_weights_on_model_save",
            "prefetch_bucket_size",
            "param_persistence_threshold",
            "max_live_parameters",
            "max_reuse_distance",
            "gather_16bit_weights_on_model_save",
        }
    ),
    "fp16": frozenset({"auto_cast", "fp16_master_weights_and_grads", "type"}),
    "bf16": frozenset(
        {
            "immediate_grad_update",
            "check_grad_overflow",
            "bf16_master_weights_and_grads",
            "bf16_optimizer_states",
        }
    ),
    # NVMe and pipelining knobs of DeepSpeed's offload (only host offload is built)
    "zero_optimization.offload_optimizer": frozenset(
        {"nvme_path", "buffer_count", "pipeline", "pipeline_read", "pipeline_write",
         "fast_init", "ratio"}
    ),
    "zero_optimization.offload_param": frozenset(
        {"nvme_path", "buffer_count", "buffer_size", "max_in_cpu"}
    ),
    "optimizer": frozenset({"legacy_fusion"}),
    "optimizer.params": frozenset({"bias_correction", "set_grad_none", "fused", "foreach"}),
    "scheduler.params": frozenset({"last_batch_iteration"}),
}
DEEPSPEED_UNSUPPORTED["bfloat16"] = DEEPSPEED_UNSUPPORTED["bf16"]

# DeepSpeed spells some stage-3 options both ways; we accept only the `stage3_` spelling (the
# one in DeepSpeed's docs) and point users at it.
_RENAMED = {
    "prefetch_bucket_size": "stage3_prefetch_bucket_size",
    "param_persistence_threshold": "stage3_param_persistence_threshold",
    "max_live_parameters": "stage3_max_live_parameters",
    "max_reuse_distance": "stage3_max_reuse_distance",
    "gather_16bit_weights_on_model_save": "stage3_gather_16bit_weights_on_model_save",
    "stage3_gather_fp16_weights_on_model_save": "stage3_gather_16bit_weights_on_model_save",
}

# pydantic adds the name of the union member that failed to the error location
# (`constrained-int`, `literal['auto']`, ...). These never name a config key, so they are dropped.
_UNION_MEMBER = re.compile(
    r"^(constrained-\w+|literal\[.*\]|int|float|str|bool|none|function-\w+)$"
)


def format_path(loc: Iterable[str | int]) -> str:
    """Render a location tuple as the dotted path users write: ``optimizer.params.betas[0]``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _show(value: Any) -> str:
    """A value as it would appear in the JSON file, truncated for long sections."""
    try:
        text = json.dumps(value, default=repr)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _suggest(key: str, allowed: Iterable[str]) -> str | None:
    match = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    return match[0] if match else None


def _clean_loc(loc: tuple[str | int, ...], union_tags: Mapping[str, frozenset[str]]) -> tuple:
    """Drop union bookkeeping from a pydantic location so it matches the user's key path."""
    out: list[str | int] = []
    for i, part in enumerate(loc):
        if isinstance(part, str) and _UNION_MEMBER.match(part):
            continue
        prev = format_path(out)
        if i > 0 and isinstance(part, str) and part in union_tags.get(prev, frozenset()):
            continue
        out.append(part)
    return tuple(out)


def _section_key(path: tuple) -> str:
    """The DEEPSPEED_UNSUPPORTED key for a section path (`optimizer.params`, ...)."""
    return ".".join(str(p) for p in path)


def translate_validation_error(
    err: ValidationError,
    allowed_keys: Mapping[tuple, Sequence[str]],
    union_tags: Mapping[str, frozenset[str]],
) -> list[str]:
    """One message per problem, merged per key path (a union reports once per member).

    ``allowed_keys`` maps a *raw* pydantic section location (union tags included, so that
    ``("optimizer", "sgd", "params")`` gets SGD's keys) to the keys accepted there.
    """
    merged: dict[str, list[str]] = {}
    inputs: dict[str, Any] = {}
    for e in err.errors(include_url=False):
        raw_loc = tuple(e["loc"])
        loc = _clean_loc(raw_loc, union_tags)
        path = format_path(loc)
        kind = e["type"]
        if kind == "extra_forbidden":
            msg = _unknown_key(loc, raw_loc, allowed_keys)
            merged.setdefault(msg, [])
            continue
        if kind == "missing":
            merged.setdefault(f"`{path}` is required but missing", [])
            continue
        text = e["msg"]
        if kind in ("optimizer_type", "scheduler_type"):
            section = format_path(loc)
            value = e.get("input")
            if not isinstance(value, Mapping):
                merged.setdefault(
                    f"`{section}` = {_show(value)}: must be a JSON object with `type` and `params`",
                    [],
                )
            else:
                merged.setdefault(f"`{section}.type` = {_show(value.get('type'))}: {text}", [])
            continue
        if kind == "value_error":
            text = text.removeprefix("Value error, ")
            if text.startswith("`"):  # a cross-field check that names its own keys
                merged.setdefault(text, [])
                continue
        else:
            text = text.replace("Input should be", "must be")
            if kind in ("model_type", "model_attributes_type", "dict_type"):
                text = "must be a JSON object"
        if not path:  # whole-config checks already name every key they involve
            merged.setdefault(text, [])
            continue
        merged.setdefault(f"`{path}`", []).append(text)
        inputs[f"`{path}`"] = e.get("input")
    problems = []
    for head, reasons in merged.items():
        if not reasons:
            problems.append(head)
            continue
        reasons = list(dict.fromkeys(reasons))
        problems.append(f"{head} = {_show(inputs[head])}: {', or '.join(reasons)}")
    return problems


def _unknown_key(loc: tuple, raw_loc: tuple, allowed_keys: Mapping[tuple, Sequence[str]]) -> str:
    path = format_path(loc)
    key = str(loc[-1])
    section = _section_key(loc[:-1])
    if key in DEEPSPEED_UNSUPPORTED.get(section, frozenset()):
        hint = ""
        if section == "zero_optimization" and key in _RENAMED:
            hint = f" (use `{section}.{_RENAMED[key]}` instead)"
        return f"`{path}` is a DeepSpeed option not supported by zeroshard yet{hint}"
    allowed = list(allowed_keys.get(tuple(raw_loc[:-1]), ()))
    msg = f"unknown key `{path}`"
    guess = _suggest(key, allowed)
    if guess is not None:
        where = format_path((*loc[:-1], guess))
        msg += f"; did you mean `{where}`?"
    if allowed:
        where = f" in `{section}`" if section else ""
        msg += f"; allowed keys{where}: {', '.join(allowed)}"
    return msg

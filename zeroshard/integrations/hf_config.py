"""Resolve Hugging Face-style `"auto"` values in a DeepSpeed config (framework-free).

The rules are those of transformers' `HfTrainerDeepSpeedConfig.trainer_config_process` and
`trainer_config_finalize`, so a config written for `Trainer(deepspeed=...)` means the same here:
an `"auto"` value is filled from the training arguments, and an explicit value that disagrees
with them is an error (HF's "mismatch" list). `args` is duck-typed (a `TrainingArguments` or any
object with the same attribute names), so this module imports no framework.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

from zeroshard.config.schema import ConfigError

log = logging.getLogger(__name__)

# DeepSpeed knobs with no counterpart in zeroshard that HF's own templates set: dropped here
# (only by the HF path, and logged) so those templates load; the core still rejects them.
_TEMPLATE_NOOPS = ("sub_group_size", "round_robin_gradients")
_HIDDEN_SIZE_KEYS = (
    "zero_optimization.reduce_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold",
)


def read_config(config: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of a config given as a dict or a JSON file path."""
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    with open(config, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError([f"{os.fspath(config)}: not valid JSON ({e})"]) from None


class HfAutoConfig:
    """A DeepSpeed config dict whose `"auto"` values get filled; mismatches are collected."""

    def __init__(self, config: str | os.PathLike | Mapping[str, Any]) -> None:
        self.config = read_config(config)
        self.mismatches: list[str] = []

    # -- dotted-key access (HF's find_config_node / get_value) -----------------------------
    def _node(self, key: str, create: bool = False) -> tuple[dict[str, Any] | None, str]:
        node: Any = self.config
        *parents, leaf = key.split(".")
        for p in parents:
            if p not in node:
                if not create:
                    return None, leaf
                node[p] = {}
            node = node[p]
        return node, leaf

    def get(self, key: str, default: Any = None) -> Any:
        node, leaf = self._node(key)
        return default if node is None else node.get(leaf, default)

    def is_auto(self, key: str) -> bool:
        return self.get(key) == "auto"

    def fill_match(self, key: str, value: Any, hf_name: str, must_match: bool = True) -> None:
        """Set `key` if it is "auto"; otherwise record a mismatch with the training args."""
        node, leaf = self._node(key)
        if node is None or leaf not in node:
            return
        if node[leaf] == "auto":
            node[leaf] = value
        elif must_match and node[leaf] is not None and node[leaf] != value:
            self.mismatches.append(f"- ds {key}={node[leaf]} vs hf {hf_name}={value}")

    def fill_only(self, key: str, value: Any) -> None:
        self.fill_match(key, value, "", must_match=False)

    # -- HF's two passes ---------------------------------------------------------------------
    def process(self, args: Any, auto_find_batch_size: bool = False) -> None:
        """`trainer_config_process`: everything known before the model and the step count."""
        world = int(getattr(args, "world_size", 1))
        micro = int(args.per_device_train_batch_size)
        accum = int(args.gradient_accumulation_steps)
        self.fill_match(
            "train_micro_batch_size_per_gpu", micro, "per_device_train_batch_size",
            not auto_find_batch_size,
        )  # fmt: skip
        self.fill_match("gradient_accumulation_steps", accum, "gradient_accumulation_steps")
        self.fill_match(
            "train_batch_size", world * micro * accum, "train_batch_size (calculated)",
            not auto_find_batch_size,
        )  # fmt: skip
        self.fill_match("gradient_clipping", args.max_grad_norm, "max_grad_norm")
        self.fill_match("optimizer.params.lr", args.learning_rate, "learning_rate")
        self.fill_match(
            "optimizer.params.betas", [args.adam_beta1, args.adam_beta2], "adam_beta1+adam_beta2"
        )
        self.fill_match("optimizer.params.eps", args.adam_epsilon, "adam_epsilon")
        self.fill_match("optimizer.params.weight_decay", args.weight_decay, "weight_decay")
        self.fill_only("scheduler.params.warmup_min_lr", 0)
        self.fill_match("scheduler.params.warmup_max_lr", args.learning_rate, "learning_rate")
        fp16 = bool(getattr(args, "fp16", False) or getattr(args, "fp16_full_eval", False))
        bf16 = bool(getattr(args, "bf16", False) or getattr(args, "bf16_full_eval", False))
        self.fill_match("fp16.enabled", fp16, "fp16|fp16_full_eval")
        self.fill_match("bf16.enabled", bf16, "bf16|bf16_full_eval")

    def finalize(self, args: Any, hidden_size: int | None, num_training_steps: int) -> None:
        """`trainer_config_finalize`: hidden-size buckets, total and warmup steps; raises on
        mismatches as HF does."""
        autos = [k for k in _HIDDEN_SIZE_KEYS if self.is_auto(k)]
        if autos:
            if not hidden_size:
                raise ConfigError(
                    [f'{k} is "auto" but the model has no config.hidden_size; give a number'
                     for k in autos]
                )  # fmt: skip
            self.fill_only("zero_optimization.reduce_bucket_size", hidden_size * hidden_size)
            if self.get("zero_optimization.stage") == 3:
                self.fill_only(
                    "zero_optimization.stage3_prefetch_bucket_size",
                    int(0.9 * hidden_size * hidden_size),
                )
                self.fill_only(
                    "zero_optimization.stage3_param_persistence_threshold", 10 * hidden_size
                )
        self.fill_match(
            "scheduler.params.total_num_steps", num_training_steps,
            "num_training_steps (calculated)",
        )  # fmt: skip
        self.fill_match(
            # HF keeps it positive: DeepSpeed >= 0.19.6 rejects 0 warmup steps
            "scheduler.params.warmup_num_steps", max(1, warmup_steps(args, num_training_steps)),
            "warmup_steps",
        )  # fmt: skip
        if self.mismatches:
            raise ConfigError(
                ["config values that mismatch the training arguments (set them to \"auto\"):"]
                + self.mismatches
            )

    def for_zeroshard(self) -> dict[str, Any]:
        """The resolved dict with HF-template spellings zeroshard reads differently:
        `offload_*: {"device": "none"}` (no offload) removed, and template no-op knobs dropped."""
        out = copy.deepcopy(self.config)
        zo = out.get("zero_optimization", {})
        for key in ("offload_optimizer", "offload_param"):
            if isinstance(zo.get(key), Mapping) and zo[key].get("device", "none") == "none":
                del zo[key]
        for key in _TEMPLATE_NOOPS:
            if key in zo:
                log.info("zero_optimization.%s has no effect in zeroshard; ignored", key)
                del zo[key]
        for section in ("fp16", "bf16"):
            if isinstance(out.get(section), Mapping) and out[section].get("enabled") is False:
                out[section] = {"enabled": False}
        return out


def model_hidden_size(model: Any) -> int | None:
    """The hidden size HF derives "auto" buckets from (config.hidden_size, max(hidden_sizes),
    or the same under config.text_config)."""
    cfg = getattr(model, "config", None)
    for c in (cfg, getattr(cfg, "text_config", None)):
        if c is None:
            continue
        if getattr(c, "hidden_size", None):
            return int(c.hidden_size)
        if getattr(c, "hidden_sizes", None):
            return int(max(c.hidden_sizes))
    return None


def warmup_steps(args: Any, num_training_steps: int) -> int:
    """HF's `TrainingArguments.get_warmup_steps` (warmup_steps wins over warmup_ratio)."""
    get = getattr(args, "get_warmup_steps", None)
    if callable(get):
        return int(get(num_training_steps))
    steps = getattr(args, "warmup_steps", 0) or 0
    if steps >= 1:
        return int(steps)
    return math.ceil(num_training_steps * (steps or getattr(args, "warmup_ratio", 0.0) or 0.0))


def resolve_hf_auto(
    config: str | os.PathLike | Mapping[str, Any],
    args: Any,
    *,
    hidden_size: int | None = None,
    num_training_steps: int = 0,
) -> dict[str, Any]:
    """A DeepSpeed config with every HF `"auto"` filled from `args`, ready for
    `zeroshard.initialize` (raises ConfigError listing any value that contradicts `args`)."""
    hf = HfAutoConfig(config)
    hf.process(args)
    hf.finalize(args, hidden_size, num_training_steps)
    return hf.for_zeroshard()

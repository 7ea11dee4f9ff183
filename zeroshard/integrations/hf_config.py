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
import os
from collections.abc import Mapping
from typing import Any

from zeroshard.config.honoured import (
    HIDDEN_SIZE_AUTOS,
    TRAINER_AUTOS,
    TRAINER_FILL_ONLY,
    hidden_size_autos,
)
from zeroshard.config.schema import ConfigError

log = logging.getLogger(__name__)

# DeepSpeed knobs with no counterpart in zeroshard that HF's own templates set: dropped here
# (only by the HF path, and logged) so those templates load; the core still rejects them.
TEMPLATE_NOOPS = ("sub_group_size", "round_robin_gradients")


def read_config(config: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of a config given as a dict or a JSON file path."""
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    with open(config, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError([f"{os.fspath(config)}: not valid JSON ({e})"]) from None


# what a config without an "optimizer" section trains with, by TrainingArguments.optim
_OPTIM_TYPES = {"adamw": "AdamW", "sgd": "SGD"}
# optimizer.params / scheduler.params keys the Trainer fills when a section leaves them out
_FILLED_PARAMS = {
    "AdamW": ("lr", "betas", "eps", "weight_decay"), "Adam": ("lr", "betas", "eps", "weight_decay"),
    "SGD": ("lr", "weight_decay"), "Lion": ("lr", "betas", "weight_decay"),
    "WarmupLR": ("warmup_max_lr", "warmup_num_steps"),
    "WarmupDecayLR": ("warmup_max_lr", "warmup_num_steps", "total_num_steps"),
    "WarmupCosineLR": ("warmup_num_steps", "total_num_steps"),
}  # fmt: skip
_TOP_FILLED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
               "gradient_clipping", "fp16.enabled", "bf16.enabled")  # fmt: skip
_AT_FINALIZE = ("scheduler.params.warmup_num_steps", "scheduler.params.total_num_steps")


class HfAutoConfig:
    """A DeepSpeed config dict filled from a Trainer's arguments, as HF's DeepSpeed
    integration and Accelerate do: `"auto"` values (config.honoured.TRAINER_AUTOS) always, and,
    with `fill_missing`, every Trainer setting the config leaves out. An explicit value that
    contradicts the arguments is a mismatch; `sources` says where each setting came from."""

    def __init__(self, config: str | os.PathLike | Mapping[str, Any],
                 fill_missing: bool = True) -> None:  # fmt: skip
        self.config = read_config(config)
        self.fill_missing = fill_missing
        self.mismatches: list[str] = []
        self.sources: dict[str, str] = {}  # key -> "config" or "TrainingArguments.<name>"

    # -- dotted-key access (HF's find_config_node / get_value) -----------------------------
    def _node(self, key: str, create: bool = False) -> tuple[dict[str, Any] | None, str]:
        node: Any = self.config
        *parents, leaf = key.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                if not create or p in node:
                    return None, leaf
                node[p] = {}
            node = node[p]
        return node, leaf

    def get(self, key: str, default: Any = None) -> Any:
        node, leaf = self._node(key)
        return default if node is None else node.get(leaf, default)

    def is_auto(self, key: str) -> bool:
        return self.get(key) == "auto"

    def _missing_filled(self, key: str) -> bool:
        """Whether the Trainer fills `key` when the config leaves it out."""
        if not self.fill_missing:
            return False
        if key in _TOP_FILLED:
            return True
        section, _, leaf = key.partition(".params.")
        kind = self.get(f"{section}.type")
        kinds = {n.lower(): n for n in _FILLED_PARAMS}
        return isinstance(kind, str) and leaf in _FILLED_PARAMS.get(kinds.get(kind.lower()), ())

    def settle(self, key: str, args: Any, num_training_steps: int = 0) -> None:
        """Fill `key` from `args` where "auto" (or left out and filled), else check it."""
        hf_name, value_of = TRAINER_AUTOS[key]
        value = value_of(args, num_training_steps)
        if key.startswith("bf16.") and "bfloat16" in self.config and "bf16" not in self.config:
            key = "bfloat16." + key.split(".", 1)[1]  # DeepSpeed's other spelling
        node, leaf = self._node(key)
        present = node is not None and leaf in node
        if present and node[leaf] != "auto":
            self.sources[key] = "config"
            if key not in TRAINER_FILL_ONLY and node[leaf] is not None and node[leaf] != value:
                self.mismatches.append(
                    f"`{key}` = {json.dumps(node[leaf])} in the config contradicts "
                    f"TrainingArguments.{hf_name} = {json.dumps(value)}: set it to \"auto\" or "
                    "leave it out (the Trainer fills it)"
                )
            return
        if present or self._missing_filled(key):
            node, leaf = self._node(key, create=True)
            if node is not None:
                node[leaf] = value
                self.sources[key] = f"TrainingArguments.{hf_name.split(' ')[0]}"

    # -- HF's two passes ---------------------------------------------------------------------
    def process(self, args: Any) -> None:
        """`trainer_config_process`: everything known before the model and the step count."""
        if self.fill_missing and "optimizer" not in self.config:
            optim = str(getattr(args, "optim", "adamw_torch")).split(".")[-1].lower()
            kind = next((t for p, t in _OPTIM_TYPES.items() if optim.startswith(p)), None)
            if kind is None:
                raise ConfigError(
                    f"TrainingArguments.optim={optim!r} has no zeroshard counterpart and the "
                    'config has no "optimizer" section: use optim="adamw_torch" or "sgd", or '
                    'describe the optimizer in the config (type AdamW, Adam, SGD or Lion)'
                )
            self.config["optimizer"] = {"type": kind, "params": {}}
            self.sources["optimizer.type"] = f"TrainingArguments.optim ({optim})"
        for key in TRAINER_AUTOS:
            if key not in _AT_FINALIZE:
                self.settle(key, args)

    def finalize(self, args: Any, hidden_size: int | None, num_training_steps: int) -> None:
        """`trainer_config_finalize`: hidden-size buckets, total and warmup steps; raises on
        mismatches as HF does, listing every one."""
        autos = [k for k in HIDDEN_SIZE_AUTOS if self.is_auto(k)]
        for key, value in hidden_size_autos(autos, hidden_size).items():
            node, leaf = self._node(key)
            node[leaf] = value  # type: ignore[index]
        for key in _AT_FINALIZE:
            self.settle(key, args, num_training_steps)
        if self.mismatches:
            raise ConfigError(self.mismatches)

    def preview(self, args: Any, num_training_steps: int) -> None:
        """Both passes for `zeroshard check-config --hf`: fill every Trainer value (hidden-size
        buckets stay "auto"), keeping the mismatches in `self.mismatches`."""
        self.process(args)
        for key in _AT_FINALIZE:
            self.settle(key, args, num_training_steps)

    def describe_sources(self) -> str:
        """One line: which Trainer settings came from the arguments, which from the config."""

        def show(keys: list[str]) -> str:
            return ", ".join(f"{k}={json.dumps(self.get(k))}" for k in keys) or "none"

        args = sorted(k for k, v in self.sources.items() if v != "config")
        given = sorted(k for k, v in self.sources.items() if v == "config")
        sched = (f"the config's {self.get('scheduler.type')}" if "scheduler" in self.config
                 else "the Trainer's (lr_scheduler_type, warmup_steps or warmup_ratio)")
        return (f"zeroshard: from TrainingArguments: {show(args)}; from the config: "
                f"{show(given)}; scheduler: {sched}")  # fmt: skip

    def for_zeroshard(self) -> dict[str, Any]:
        """The resolved dict with HF-template spellings zeroshard reads differently:
        `offload_*: {"device": "none"}` (no offload) removed, and template no-op knobs dropped."""
        out = copy.deepcopy(self.config)
        zo = out.get("zero_optimization", {})
        for key in ("offload_optimizer", "offload_param"):
            if isinstance(zo.get(key), Mapping) and zo[key].get("device", "none") == "none":
                del zo[key]
        for key in TEMPLATE_NOOPS:
            if key in zo:
                log.info("zero_optimization.%s has no effect in zeroshard; ignored", key)
                del zo[key]
        for section in ("fp16", "bf16"):
            if isinstance(out.get(section), Mapping) and out[section].get("enabled") is False:
                out[section] = {"enabled": False}
        return out


def resolve_hf_auto(
    config: str | os.PathLike | Mapping[str, Any],
    args: Any,
    *,
    hidden_size: int | None = None,
    num_training_steps: int = 0,
    fill_missing: bool = False,
) -> dict[str, Any]:
    """A DeepSpeed config with every HF `"auto"` filled from `args` (and, with
    `fill_missing`, every Trainer setting it leaves out), ready for `zeroshard.initialize`;
    raises ConfigError listing every value that contradicts `args`."""
    hf = HfAutoConfig(config, fill_missing=fill_missing)
    hf.process(args)
    hf.finalize(args, hidden_size, num_training_steps)
    return hf.for_zeroshard()

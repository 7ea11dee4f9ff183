"""ZeRO++ in the config: DeepSpeed's four keys, what they may hold and where they apply.

- `zero_quantized_weights` (qwZ), `zero_quantized_nontrainable_weights` (qwZ for frozen
  parameters), `zero_quantized_gradients` (qgZ): JSON true/false, nothing else (a string
  "yes" or a 1 is a typo, not a switch);
- `zero_hpz_partition_size` (hpZ): a number of ranks; 1 is off, and 0 too, as in DeepSpeed
  (its field is `ge=0` and only a size > 1 builds the secondary partition).

All four are stage-3 options: on (true, or a size > 1) at stages 0-2 they are refused, where
DeepSpeed silently ignores them. What the schema cannot know, the ranks per node and the world
size, is checked by :func:`check_zeropp_topology`, which the runtime (on every rank, at
construction) and `zeroshard check-config` both call, so both word a problem the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from zeroshard.config.errors import ConfigError

__all__ = ["MAX_RANKS", "ZEROPP_BOOL_KEYS", "ZeroPPConfig", "check_zeropp_topology"]

ZEROPP_BOOL_KEYS = (
    "zero_quantized_weights",
    "zero_quantized_nontrainable_weights",
    "zero_quantized_gradients",
)
HPZ_KEY = "zero_hpz_partition_size"
MAX_RANKS = 2**20  # more ranks than any job runs: a larger size is a typo

# why each key needs stage 3 (parameters are partitioned and gathered per unit only there)
_STAGE3_ONLY = {
    "zero_quantized_weights": "qwZ quantizes stage 3's parameter all-gather; below stage 3 "
                              "every rank holds the full parameters",
    "zero_quantized_nontrainable_weights": "it quantizes stage 3's all-gather of frozen "
                                           "parameters; below stage 3 every rank holds them",
    "zero_quantized_gradients": "qgZ replaces stage 3's per-unit gradient reduce-scatter "
                                "(DeepSpeed builds it in its stage-3 optimizer only and "
                                "ignores it below)",
    HPZ_KEY: "hpZ keeps a secondary partition of stage 3's parameters; below stage 3 "
             "parameters are not partitioned",
}  # fmt: skip


@dataclass(frozen=True)
class ZeroPPConfig:
    """The ZeRO++ settings of a `zero_optimization` section, read-only."""

    quantized_weights: bool = False
    quantized_nontrainable_weights: bool = False
    quantized_gradients: bool = False
    hpz_partition_size: int = 1

    @property
    def enabled(self) -> bool:
        """Whether any ZeRO++ part is on."""
        return (self.quantized_weights or self.quantized_nontrainable_weights
                or self.quantized_gradients or self.hpz_partition_size > 1)  # fmt: skip

    @classmethod
    def of(cls, zo: Any) -> ZeroPPConfig:
        """From a validated `ZeroOptimizationConfig`."""
        return cls(bool(zo.zero_quantized_weights), bool(zo.zero_quantized_nontrainable_weights),
                   bool(zo.zero_quantized_gradients), int(zo.zero_hpz_partition_size))  # fmt: skip


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return f"the string {json.dumps(value)}"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    return "a JSON " + ("list" if isinstance(value, (list, tuple)) else "object")


def strict_bool(value: Any) -> Any:
    """Before validation of a ZeRO++ switch: only JSON true/false (pydantic alone would read
    "yes", "on" and 1 as true)."""
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, not {_kind(value)}")
    return value


def hpz_size(value: Any) -> Any:
    """Before validation of `zero_hpz_partition_size`: a whole number of ranks; DeepSpeed's
    0 ("off") reads as 1. Floats and booleans are left to `Section`'s own wording."""
    if isinstance(value, (bool, float)):
        return value
    if not isinstance(value, int):
        raise ValueError(f"must be a whole number of ranks (1 = off), not {_kind(value)}")
    if not 0 <= value <= MAX_RANKS:
        raise ValueError(f"must be a number of ranks from 1 to {MAX_RANKS} (1 = off, as is "
                         "DeepSpeed's 0)")  # fmt: skip
    return max(value, 1)


def _on(zo: Any) -> dict[str, str]:
    """The ZeRO++ keys switched on -> each with its value, as a message shows it."""
    out = {k: f"`zero_optimization.{k}` = true" for k in ZEROPP_BOOL_KEYS if getattr(zo, k)}
    if zo.zero_hpz_partition_size > 1:
        out[HPZ_KEY] = f"`zero_optimization.{HPZ_KEY}` = {zo.zero_hpz_partition_size}"
    return out


def zeropp_problems(zo: Any) -> list[str]:
    """After validation: ZeRO++ keys at the wrong stage, and the combinations that cannot
    work (DeepSpeed's refusals among them)."""
    if zo.stage < 3:
        return [
            f"{shown} is a stage-3 option (stage is {zo.stage}): {_STAGE3_ONLY[key]}; "
            "use stage 3 or remove the key"
            for key, shown in _on(zo).items()
        ]
    out = []
    if zo.zero_quantized_gradients and not zo.reduce_scatter:
        # DeepSpeed asserts the same (runtime/zero/stage3.py, "when enable all_to_all_reduce,
        # reduce_scatter should also be enabled")
        out.append("`zero_optimization.zero_quantized_gradients` = true needs "
                   "`zero_optimization.reduce_scatter` = true: qgZ is a quantized "
                   "reduce-scatter; remove one of the two keys")  # fmt: skip
    return out


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"check_zeropp_topology: {name} must be a positive int, got {value!r}")
    return value


def check_zeropp_topology(zo: Any, world_size: int, local_world_size: int) -> None:
    """Raise :class:`ConfigError` (a ValueError) naming the key when the ZeRO++ settings of
    `zo` (a validated `ZeroOptimizationConfig`) cannot run on `world_size` ranks in nodes of
    `local_world_size` (torchrun's LOCAL_WORLD_SIZE; the world size when unset).

    hpZ's secondary partition lives within one node, so its size must divide the ranks of a
    node; hpZ and qgZ need every node to hold the same number of ranks. A local size above
    the world size is read as the world size, as the runtime reads torchrun's environment.
    With one rank nothing is gathered or reduced, so any setting runs (as plain stage 3).
    """
    world = _positive("world_size", world_size)
    local = min(_positive("local_world_size", local_world_size), world)
    hpz = int(zo.zero_hpz_partition_size)
    uses_nodes = [shown for key, shown in _on(zo).items()
                  if key in (HPZ_KEY, "zero_quantized_gradients")]  # fmt: skip
    if world == 1 or not uses_nodes:
        return
    if world % local:
        raise ConfigError(
            f"{' and '.join(uses_nodes)} need every node to run the same number of ranks, but "
            f"LOCAL_WORLD_SIZE={local} does not divide the world size {world} (torchrun "
            "--nproc-per-node sets the ranks per node)"
        )
    if hpz > 1 and local % hpz:
        sizes = [d for d in range(1, local + 1) if local % d == 0]
        raise ConfigError(
            f"`zero_optimization.{HPZ_KEY}` = {hpz} does not divide the {local} ranks of a "
            f"node (LOCAL_WORLD_SIZE={local}, world size {world}): hpZ keeps each secondary "
            f"partition within one node; use one of {', '.join(map(str, sizes))}"
        )

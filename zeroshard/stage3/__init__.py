"""ZeRO stage 3: parameters, gradients and optimizer state all sharded across ranks.

- unit.py: `ShardedUnit`, one module's parameters kept as this rank's chunk between uses;
- engine.py: `Stage3Engine`, the hooks that gather/release/reduce units and prefetch;
- optimizer.py: `Stage3Optimizer`, ZeroOptimizer's step on the units' shards;
- build.py: `build_stage3(model, cfg, params, group)`, building all of the above
  (called by `zeroshard.initialize`);
- partition_on_init.py: `Init`, partitioning parameters while the model is built;
- gathered.py: `GatheredParameters`, full parameters for user code;
- state_dict.py: full-tensor `model.state_dict()` and `full_state_dict`;
- registry.py: side tables parameter -> unit and model -> engine.
"""

from typing import Any

from .gathered import GatheredParameters
from .partition_on_init import Init
from .state_dict import full_state_dict

__all__ = ["GatheredParameters", "Init", "full_state_dict", "initialize_stage3"]


def __getattr__(name: str) -> Any:
    # `initialize_stage3` is `zeroshard.initialize` restricted to stage 3; it lives with
    # `initialize` (which imports this package), so it is fetched on first use.
    if name == "initialize_stage3":
        from ..initialize import initialize_stage3

        return initialize_stage3
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

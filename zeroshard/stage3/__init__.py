"""ZeRO stage 3: parameters, gradients and optimizer state all sharded across ranks.

- unit.py: `ShardedUnit`, one module's parameters kept as this rank's chunk between uses;
- schedule.py: `Stage3Engine`, the hooks that gather/release/reduce units and prefetch;
- optimizer.py: `Stage3Optimizer`, ZeroOptimizer's step on the units' shards;
- initialize.py: `initialize_stage3(model, cfg)`, building all of the above;
- init.py: `Init`, partitioning parameters while the model is built;
- gathered.py: `GatheredParameters`, full parameters for user code;
- state_dict.py: full-tensor `model.state_dict()` and `full_state_dict`.
"""

from .gathered import GatheredParameters
from .init import Init
from .initialize import build_units, initialize_stage3
from .optimizer import Stage3Optimizer
from .schedule import Stage3Engine
from .state_dict import full_state_dict
from .unit import GatherTracker, ShardedUnit

__all__ = [
    "GatherTracker",
    "GatheredParameters",
    "Init",
    "ShardedUnit",
    "Stage3Engine",
    "Stage3Optimizer",
    "build_units",
    "full_state_dict",
    "initialize_stage3",
]

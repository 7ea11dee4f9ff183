"""ZeRO stage 3: parameters, gradients and optimizer state all sharded across ranks.

- unit.py: `ShardedUnit`, one module's parameters kept as this rank's chunk between uses;
- engine.py: `Stage3Engine`, the hooks that gather/release/reduce units and prefetch;
- sharding.py: `UnitSharding`, stage 3 as a builder of shard groups over the units;
- build.py: `build_stage3(model, cfg, params, group)`, building all of the above
  (called by `zeroshard.initialize`);
- partition_on_init.py: `Init`, partitioning parameters while the model is built;
- gathered.py: `GatheredParameters`, full parameters for user code;
- state_dict.py: full-tensor `model.state_dict()` and `full_state_dict`;
- registry.py: side tables parameter -> unit and model -> engine;
- shapes.py: `full_shape(p)` / `full_numel(p)` (DeepSpeed's `p.ds_shape` / `p.ds_numel`) and
  the full-shape placeholder a released parameter holds.
"""

from zeroshard.stage3.gathered import GatheredParameters
from zeroshard.stage3.partition_on_init import Init
from zeroshard.stage3.shapes import full_numel, full_shape
from zeroshard.stage3.state_dict import full_state_dict

__all__ = ["GatheredParameters", "Init", "full_numel", "full_shape", "full_state_dict"]

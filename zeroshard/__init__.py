"""zeroshard: ZeRO-style sharded optimizer for PyTorch (stages 0-3) on torch.distributed.

Two ways in:
- drop-in: `opt = zeroshard.ZeroOptimizer(model.parameters(), "adamw", stage=2, lr=3e-4)`
- config-driven: `model, opt = zeroshard.initialize(model, "configs/zero2.json")`

What each rank updates is a list of `ShardGroup`s (`opt.shard_groups`), whose optimizer
state is stored by a `StateCodec` in memory chosen by a `Placement` (`zeroshard.shard`).
"""

from zeroshard.checkpoint import CheckpointError, consolidate, load_checkpoint, save_checkpoint
from zeroshard.config.schema import ConfigError, load_config
from zeroshard.initialize import initialize
from zeroshard.optimizer import ZeroOptimizer
from zeroshard.precision import LossScaler
from zeroshard.shard import Placement, ShardGroup, StateCodec
from zeroshard.shard.layout import ShardLayout, ShardState
from zeroshard.stage3 import GatheredParameters, Init

__all__ = [
    "CheckpointError",
    "ConfigError",
    "GatheredParameters",
    "Init",
    "LossScaler",
    "Placement",
    "ShardGroup",
    "ShardLayout",
    "ShardState",
    "StateCodec",
    "ZeroOptimizer",
    "consolidate",
    "initialize",
    "load_checkpoint",
    "load_config",
    "save_checkpoint",
]
__version__ = "0.1.0"

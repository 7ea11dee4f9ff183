"""Shard groups: what each rank updates, where its gradients come from, how its state is kept.

- group.py: `ShardGroup`, one (param group, dtype) update unit at any stage;
- codec.py: `StateCodec`, how optimizer state is stored (`Fp32States` by default);
- placement.py: `Placement`, where master and state live (`OnDevice` by default);
- flat.py: `FlatSharding`, stages 0-2 as a builder of shard groups over flat buffers
  (stage 3's builder is `zeroshard.stage3.sharding.UnitSharding`).
"""

from zeroshard.shard.codec import FP32, Fp32States, StateCodec
from zeroshard.shard.group import HeldParam, ShardGroup
from zeroshard.shard.placement import ON_DEVICE, OnDevice, Placement

__all__ = [
    "FP32", "ON_DEVICE", "Fp32States", "HeldParam", "OnDevice", "Placement", "ShardGroup",
    "StateCodec",
]  # fmt: skip

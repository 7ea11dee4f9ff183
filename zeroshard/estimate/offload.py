"""How offload to the host moves a rank's model states (the estimator's rule, checked against
`memory_report()` by tests/test_estimate.py).

`offload_optimizer`: the fp32 master is a host buffer of its own (even for fp32 parameters),
the optimizer states live next to it, and each step's reduced gradients are staged in a host
fp32 buffer of the master's size (the device keeps its gradient buffers too).
`offload_param` (stage 3): the partitioned parameter shards live in host memory.
"""

from __future__ import annotations

from zeroshard.config.schema import ZeroConfig


def with_offload(
    report: dict[str, int], cfg: ZeroConfig, master_numel: int, param_shard_bytes: int
) -> dict[str, int]:
    """`report` (bytes per category without offload) with the config's offload applied, and
    `host`: how many of those bytes live in host memory. `master_numel`: elements of this
    rank's master pieces; `param_shard_bytes`: its offloadable stage-3 parameter shards."""
    zo = cfg.zero_optimization
    host = 0
    if zo.offload_optimizer is not None:
        report["master"] = 4 * master_numel
        report["grads"] += 4 * master_numel
        host += report["master"] + report["optimizer_states"] + 4 * master_numel
    if zo.offload_param is not None:
        host += param_shard_bytes
    report["host"] = host
    return report

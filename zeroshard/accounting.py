"""Bytes held on this rank, counted from the tensors themselves.

Each category lists the tensors the optimizer (or the stage-3 engine) actually holds. Bytes are
counted per storage, once: a tensor that is a view of storage already counted in an earlier
category adds nothing. That is how an fp32 master shard that is a view of the parameters
shows up as 0 bytes of `master`: by measurement, not by a special case.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import Tensor

CATEGORIES = ("params", "grads", "master", "optimizer_states", "comm_buffers")


def _storage_key(t: Tensor) -> tuple[str, int]:
    s = t.untyped_storage()
    return (str(t.device), s.data_ptr())


def memory_report(
    held: Mapping[str, Iterable[Tensor]], host: Iterable[Tensor] = (), memory: str = "all"
) -> dict[str, int]:
    """Bytes per category (`CATEGORIES` order decides who owns shared storage) and `total`.

    `host`: tensors living in host memory (an offload placement's buffers, offloaded stage-3
    shards); every other tensor is device memory. `memory` = "all" counts both and adds the
    `device` and `host` totals; "device" or "host" counts only that memory, per category.
    """
    if memory not in ("all", "device", "host"):
        raise ValueError(f'memory must be "all", "device" or "host", got {memory!r}')
    in_host = {_storage_key(t) for t in host if t is not None}
    seen: set[tuple[str, int]] = set()
    report: dict[str, int] = {}
    host_total = 0
    for cat in CATEGORIES:
        total = 0
        for t in held.get(cat, ()):
            if t is None or t.numel() == 0:
                continue
            key = _storage_key(t)
            if key in seen:
                continue
            seen.add(key)
            nbytes = t.untyped_storage().nbytes()
            is_host = key in in_host
            host_total += nbytes if is_host else 0
            if memory == "all" or is_host == (memory == "host"):
                total += nbytes
        report[cat] = total
    report["total"] = sum(report[c] for c in CATEGORIES)
    if memory == "all":
        report["device"] = report["total"] - host_total
        report["host"] = host_total
    return report


def zero_formula(
    numel: int,
    stage: int,
    world_size: int,
    param_bytes: int = 4,
    grad_bytes: int = 4,
    state_tensors: int = 2,
) -> dict[str, float]:
    """The ZeRO paper's model-state bytes per rank for `numel` trainable parameters.

    `param_bytes`/`grad_bytes` are the element sizes of the model's parameters and of the
    gradients as held; the fp32 master copy exists only when params are not fp32 (with fp32
    params the master is the parameter). `state_tensors` fp32 tensors per element (Adam: 2).
    """
    n = world_size
    shard = lambda b, sharded: numel * b / (n if sharded else 1)  # noqa: E731
    report = {
        "params": shard(param_bytes, stage >= 3),
        "grads": shard(grad_bytes, stage >= 2),
        "master": 0.0 if param_bytes == 4 else shard(4, stage >= 1),
        "optimizer_states": shard(4 * state_tensors, stage >= 1),
    }
    report["total"] = sum(report.values())
    return report

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


def memory_report(held: Mapping[str, Iterable[Tensor]]) -> dict[str, int]:
    """Bytes per category (`CATEGORIES` order decides who owns shared storage) and `total`."""
    seen: set[tuple[str, int]] = set()
    report: dict[str, int] = {}
    for cat in CATEGORIES:
        total = 0
        for t in held.get(cat, ()):
            if t is None or t.numel() == 0:
                continue
            key = _storage_key(t)
            if key in seen:
                continue
            seen.add(key)
            total += t.untyped_storage().nbytes()
        report[cat] = total
    report["total"] = sum(report[c] for c in CATEGORIES)
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

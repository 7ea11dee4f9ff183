"""Update rules by name, and their hyperparameter defaults (torch.optim's, so a drop-in swap
of `torch.optim.AdamW(params, lr=...)` for `ZeroOptimizer(params, "adamw", lr=...)` means the
same thing)."""

from __future__ import annotations

from typing import Any

import torch

RULE_DEFAULTS: dict[str, dict[str, Any]] = {
    "adamw": {
        "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2,
        "amsgrad": False, "maximize": False,
    },
    "adam": {
        "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
        "amsgrad": False, "maximize": False,
    },
    "sgd": {
        "lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "nesterov": False,
        "weight_decay": 0.0, "maximize": False,
    },
    "lion": {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0},
    # AdamW with blockwise 8-bit states; block_size and min_8bit_size configure its codec
    # (zeroshard.quant8.codec), not the param groups
    "adamw8bit": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2},
}  # fmt: skip

_TORCH_CLASSES = {torch.optim.AdamW: "adamw", torch.optim.Adam: "adam", torch.optim.SGD: "sgd"}


def resolve_rule(
    optimizer: str | type[torch.optim.Optimizer], hyperparams: dict[str, Any]
) -> tuple[str, dict[str, Any], type[torch.optim.Optimizer] | None]:
    """Returns (rule name, defaults for the param groups, generic torch class or None).

    torch.optim.AdamW/Adam/SGD map to our fused rules; any other Optimizer subclass runs as
    the generic path on the flat shard.
    """
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        if optimizer in _TORCH_CLASSES:
            optimizer = _TORCH_CLASSES[optimizer]
        else:
            return optimizer.__name__.lower(), dict(hyperparams), optimizer
    if not isinstance(optimizer, str) or optimizer.lower() not in RULE_DEFAULTS:
        raise ValueError(
            f"optimizer must be one of {sorted(RULE_DEFAULTS)} or a torch.optim.Optimizer "
            f"subclass, got {optimizer!r}"
        )
    rule = optimizer.lower()
    allowed = RULE_DEFAULTS[rule]
    unknown = set(hyperparams) - set(allowed)
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {sorted(unknown)} for optimizer {rule!r}; "
            f"allowed: {sorted(allowed)}"
        )
    defaults = {**allowed, **hyperparams}
    if "betas" in defaults:
        defaults["betas"] = tuple(defaults["betas"])
    if rule == "sgd" and defaults["nesterov"] and (
        defaults["momentum"] <= 0 or defaults["dampening"] != 0
    ):
        raise ValueError("SGD nesterov requires momentum > 0 and dampening == 0")
    return rule, defaults, None

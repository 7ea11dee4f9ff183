"""Stage-3 training jobs (run on every rank), configs and single-process references, shared by
the stage-3 parity, API and memory tests."""


from __future__ import annotations

import torch

from tests.models import batch, loss_fn, param_groups
from tests.models_stage3 import build

GLOBAL_BATCH = 8
STEPS = 4
OPT = {
    "adamw": ({"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95],
                                           "weight_decay": 0.1}},
              torch.optim.AdamW, {"lr": 3e-3, "betas": (0.9, 0.95)}),
    "sgd": ({"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9, "nesterov": True,
                                       "weight_decay": 0.01}},
            torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
}  # fmt: skip
WD = {"adamw": 0.1, "sgd": 0.01}


def stage3_config(rule: str = "adamw", precision: str = "fp32", **zero) -> dict:
    zo = {
        "stage": 3, "reduce_bucket_size": 700, "stage3_prefetch_bucket_size": 2500,
        "stage3_param_persistence_threshold": 0, **zero,
    }  # fmt: skip
    cfg = {"zero_optimization": zo, "optimizer": OPT[rule][0]}
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def rank_world() -> tuple[int, int]:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def local_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    rank, world = rank_world()
    x, y = batch(step, GLOBAL_BATCH)
    n = GLOBAL_BATCH // world
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


def train_stage3(model_name: str, rule: str, precision: str = "fp32", steps: int = STEPS,
                 gas: int = 1, clip: float = 0.0, **zero) -> dict:  # fmt: skip
    """One rank's share of a run; returns full parameters (via the gathered state_dict)."""
    from zeroshard import initialize

    model = build(model_name)
    groups = param_groups(model, weight_decay=WD[rule])
    cfg = stage3_config(rule, precision, **zero)
    cfg.update(gradient_accumulation_steps=gas, gradient_clipping=clip)
    model, opt = initialize(model, cfg, model_parameters=groups)
    losses = []
    for step in range(steps):
        x, y = local_batch(step)
        micro = x.shape[0] // gas
        for k in range(gas):
            loss = loss_fn(model, x[k * micro : (k + 1) * micro], y[k * micro : (k + 1) * micro])
            opt.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    engine = opt.sharding.engine
    leaked = engine.tracker.current
    sd = model.state_dict()
    names = dict(model.named_parameters())
    return {
        "params": {k: v.float() for k, v in sd.items() if k in names},
        "losses": losses,
        "leaked_bytes": leaked,
    }


def train_reference(model_name: str, rule: str, clip: float = 0.0, steps: int = STEPS) -> dict:
    model = build(model_name)
    _, cls, kwargs = OPT[rule]
    opt = cls(param_groups(model, weight_decay=WD[rule]), **kwargs)
    for step in range(steps):
        x, y = batch(step, GLOBAL_BATCH)
        loss_fn(model, x, y).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for p in model.parameters():  # zeroshard treats "no gradient this step" as zero
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if k in dict(model.named_parameters())}  # fmt: skip


def many(jobs: list[tuple]) -> list[dict]:
    """Several runs in one pool job (spawning work on 4 ranks is the slow part)."""
    return [train_stage3(*job[:-1], **job[-1]) for job in jobs]


_REF: dict = {}


def reference(model_name: str, rule: str, clip: float = 0.0) -> dict:
    if (model_name, rule, clip) not in _REF:
        _REF[(model_name, rule, clip)] = train_reference(model_name, rule, clip)
    return _REF[(model_name, rule, clip)]


def assert_close(got: dict, want: dict, rtol: float = 1e-5, atol: float = 1e-6) -> float:
    assert got.keys() == want.keys()
    worst = 0.0
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=name)
        worst = max(worst, (got[name] - want[name]).abs().max().item())
    return worst


def train_stage2_bf16(steps: int = STEPS) -> dict:
    """The same bf16 run through ZeroOptimizer stage 2 (fp32 master, fp32 reduction)."""
    import zeroshard

    model = build("core").to(torch.bfloat16)
    _, _, kwargs = OPT["adamw"]
    opt = zeroshard.ZeroOptimizer(
        param_groups(model, weight_decay=WD["adamw"]), "adamw", stage=2, **kwargs
    )
    for step in range(steps):
        x, y = local_batch(step)
        opt.backward(loss_fn(model, x, y))
        opt.step()
        opt.zero_grad()
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def bf16_job() -> tuple[dict, dict]:
    return train_stage3("core", "adamw", "bf16"), train_stage2_bf16()

"""Stage 0-2 parity jobs (run on every rank) and their single-process torch.optim references,
shared by the parity, precision and optimizer-API tests."""


from __future__ import annotations

import torch

import zeroshard
from tests.models import batch, loss_fn, make_model, param_groups

GLOBAL_BATCH = 16
STEPS = 10
RULES = {
    "adamw": (torch.optim.AdamW, {"lr": 3e-3, "betas": (0.9, 0.95)}),
    "adam": (torch.optim.Adam, {"lr": 3e-3, "weight_decay": 0.01}),
    "sgd": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
}


def _rank_world():
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def train_zero(stage: int, rule: str, gas: int = 1, clip: float = 0.0, bucket: int = 700,
               dtype: str = "fp32", steps: int = STEPS, inject_inf_at: int = -1) -> dict:
    """One rank's share of a run; returns the final full parameters and per-step losses."""
    rank, world = _rank_world()
    model = make_model()
    model.to(getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]))
    kwargs = dict(RULES[rule][1])
    scaler = None
    if dtype == "fp16":
        scaler = zeroshard.LossScaler(scale=2.0**8, hysteresis=1)
    opt = zeroshard.ZeroOptimizer(
        param_groups(model, weight_decay=kwargs.pop("weight_decay", 0.1)), rule, stage=stage,
        reduce_bucket_size=bucket, gradient_clipping=clip, gradient_accumulation_steps=gas,
        loss_scaler=scaler, **kwargs,
    )  # fmt: skip
    losses, scales = [], []
    for step in range(steps):
        x, y = batch(step, GLOBAL_BATCH)
        local = GLOBAL_BATCH // world
        x, y = x[rank * local : (rank + 1) * local], y[rank * local : (rank + 1) * local]
        micro = local // gas
        total = 0.0
        for k in range(gas):
            sl = slice(k * micro, (k + 1) * micro)
            loss = loss_fn(model, x[sl], y[sl])
            if step == inject_inf_at and k == 0 and rank == world - 1:
                loss = loss * float("inf")
            opt.backward(loss)
            total += loss.item() / gas
        scales.append(opt.loss_scale)
        opt.step()
        opt.zero_grad()
        losses.append(total)
    states = [opt.shard_state(g.index) for g in opt.layout().groups]
    return {
        "params": {n: p.detach().float().clone() for n, p in model.named_parameters()},
        "losses": losses,
        "skipped": opt.skipped_steps,
        "scales": scales,
        "memory": opt.memory_report(),
        "comm": opt.comm_report(),
        "master": [m.clone() for st in states for m in st.master],
        "state": {k: [t.clone() for t in v] for st in states for k, v in st.state.items()},
    }


def train_reference(rule: str, clip: float = 0.0, steps: int = STEPS) -> dict:
    model = make_model()
    cls, kwargs = RULES[rule]
    kwargs = dict(kwargs)
    opt = cls(param_groups(model, weight_decay=kwargs.pop("weight_decay", 0.1)), **kwargs)
    for step in range(steps):
        x, y = batch(step, GLOBAL_BATCH)
        loss_fn(model, x, y).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


_REFERENCE: dict = {}


def reference(rule: str, clip: float = 0.0) -> dict:
    if (rule, clip) not in _REFERENCE:
        _REFERENCE[(rule, clip)] = train_reference(rule, clip)
    return _REFERENCE[(rule, clip)]


def assert_params_close(got: dict, want: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=name)

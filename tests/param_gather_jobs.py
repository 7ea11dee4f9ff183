"""Jobs for tests/test_param_gather.py: stages 1-2 with `overlap_param_gather`, the updated
parameters' all-gather finished behind the next forward.

On two CPU ranks an all-gather of a tiny model is over in microseconds, so a forward that
forgot to wait would still read the right values. `LazyGather` makes forgetting visible: the
collective runs only when it is waited for, so until then every other rank's chunks hold the
previous step's values."""

from __future__ import annotations

from typing import Any

import torch

import zeroshard
from tests.models import batch, loss_fn, make_model, param_groups
from tests.parity_jobs import GLOBAL_BATCH, RULES, STEPS, _rank_world


class LazyGather:
    """A `Collectives` whose all-gathers run when waited for, not when launched."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm

    def __getattr__(self, name: str) -> Any:
        return getattr(self.comm, name)

    def all_gather(self, output, input, async_op=False, **kw):  # noqa: A002
        comm = self.comm

        class Deferred:
            def wait(self) -> bool:
                comm.all_gather(output, input, **kw)
                return True

        work = Deferred()
        if not async_op:
            work.wait()
            return None
        return work


def _lazy(opt: zeroshard.ZeroOptimizer) -> None:
    deferred = opt.sharding.deferred
    deferred.comm = LazyGather(deferred.comm)


def _local(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    rank, world = _rank_world()
    x, y = batch(step, GLOBAL_BATCH)
    local = GLOBAL_BATCH // world
    return x[rank * local : (rank + 1) * local], y[rank * local : (rank + 1) * local]


def train(stage: int, overlap: bool, gas: int = 1) -> dict:
    """The parity run of tests/parity_jobs.py (AdamW, two param groups, 700-element buckets,
    a tied embedding, nn.MultiheadAttention) with or without the deferred gather."""
    model = make_model()
    kwargs = dict(RULES["adamw"][1])
    opt = zeroshard.ZeroOptimizer(
        param_groups(model, weight_decay=kwargs.pop("weight_decay", 0.1)), "adamw",
        stage=stage, reduce_bucket_size=700, gradient_accumulation_steps=gas,
        overlap_param_gather=overlap, model=model, **kwargs,
    )  # fmt: skip
    if overlap:
        _lazy(opt)
    losses, pending = [], []
    for step in range(STEPS):
        x, y = _local(step)
        micro = x.shape[0] // gas
        total = 0.0
        for k in range(gas):
            loss = loss_fn(model, x[k * micro : (k + 1) * micro], y[k * micro : (k + 1) * micro])
            opt.backward(loss)
            total += loss.item() / gas
        opt.step()
        pending.append(opt.sharding.deferred.pending if overlap else False)
        opt.zero_grad()
        losses.append(total)
    with torch.no_grad():  # an evaluation forward right after the last step
        eval_loss = loss_fn(model, *batch(99, 4)).item()
    opt.finish_param_gather()
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "losses": losses, "eval": eval_loss, "pending": pending, "comm": opt.comm_report(),
        "buckets": sum(len(f.buckets) for f in opt.sharding.flats),
    }  # fmt: skip


def stale_until_finished() -> dict:
    """After step(), before any forward: parameters lying wholly in another rank's chunks
    still hold their old values; `finish_param_gather()` brings every one up to date."""
    model = make_model()
    opt = zeroshard.ZeroOptimizer(model.parameters(), "sgd", stage=2, lr=0.5,
                                  reduce_bucket_size=700, overlap_param_gather=True,
                                  model=model)  # fmt: skip
    _lazy(opt)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss_fn(model, *_local(0)).backward()
    opt.step()
    names = dict(model.named_parameters())
    old = sorted(n for n, v in before.items() if torch.equal(names[n], v))
    opt.finish_param_gather()
    old_after = sorted(n for n, v in before.items() if torch.equal(names[n], v))
    return {"old": old, "old_after": old_after, "trainable": len(before)}


def _initialize(overlap: bool, drop_in: bool = False) -> tuple[torch.nn.Module, Any]:
    if drop_in:  # what a DDP + AdamW user writes
        model = make_model()
        return model, zeroshard.ZeroOptimizer(
            model.parameters(), "adamw", stage=2, lr=3e-3, betas=(0.9, 0.95),
            reduce_bucket_size=700, overlap_param_gather=overlap, model=model,
        )  # fmt: skip
    cfg = {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // _rank_world()[1],
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95]}},
        "zero_optimization": {"stage": 2, "reduce_bucket_size": 700,
                              "overlap_param_gather": overlap},
    }  # fmt: skip
    return zeroshard.initialize(make_model(), cfg)


def state_dicts_after_step(drop_in: bool) -> dict:
    """Config-driven or drop-in: `model.state_dict()` and `optimizer.state_dict()` taken
    right after `step()` (no forward in between) against the same run without the deferred
    gather."""
    out = {}
    for overlap in (False, True):
        model, opt = _initialize(overlap, drop_in)
        if overlap:
            _lazy(opt)
        for step in range(3):
            loss_fn(model, *_local(step)).backward()
            opt.step()
            opt.zero_grad()
        pending = opt.sharding.deferred.pending if overlap else False
        state = {k: v.clone() for k, v in model.state_dict().items()}
        out[overlap] = {
            "pending_before": pending,
            "pending_after": opt.sharding.deferred.pending if overlap else False,
            "model": state,
            "exp_avg": opt.state_dict()["state"][0]["exp_avg"],
        }
    return out


def train_compiled(in_place: bool) -> dict:
    """`torch.compile(model)` (a wrapper) or `model.compile()` (in place): the compiled
    forward runs no per-module hooks, so the gather must be finished before it runs."""
    import warnings

    warnings.filterwarnings("ignore", message=".*global hooks.*")
    out = {}
    for overlap in (False, True):
        model = make_model()
        opt = zeroshard.ZeroOptimizer(model.parameters(), "adamw", stage=2, lr=1e-2,
                                      reduce_bucket_size=700, overlap_param_gather=overlap,
                                      model=model)  # fmt: skip
        if overlap:
            _lazy(opt)
        if in_place:
            model.compile()
            run = model
        else:
            run = torch.compile(model)
        losses = []
        for step in range(4):
            loss = loss_fn(run, *_local(step))
            opt.backward(loss)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        out[overlap] = losses
    return out

"""Rank jobs for tests/test_seams.py: ordinary user habits around a zeroshard optimizer
(issue 8). Each job trains the tiny transformer of tests/models.py on 2 gloo ranks the way a
DDP / HF Trainer / DeepSpeed user would, and returns its final parameters (compared with
single-process torch.optim.AdamW) or the text of the error it got."""

from __future__ import annotations

import contextlib
import io
from unittest import mock

import torch
import torch.distributed as dist

import zeroshard
from tests.models import batch, loss_fn, make_model

GLOBAL_BATCH = 16
STEPS = 4
LR = 3e-3


def rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def config(stage: int, **extra) -> dict:
    zo = {"stage": stage, "reduce_bucket_size": 700, "allgather_bucket_size": 700}
    if stage < 3:
        zo["reduce_bucket_size"] = 700
    zo.update(extra.pop("zero", {}))
    return {
        "train_micro_batch_size_per_gpu": 8,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.95]}},
        "zero_optimization": zo,
        **extra,
    }


def build(stage: int, model=None, **extra):
    """(model, optimizer) from zeroshard.initialize at `stage`."""
    model = model if model is not None else make_model()
    return zeroshard.initialize(model, config(stage, **extra))


def local_batch(step: int):
    rank, world = rank_world()
    x, y = batch(step, GLOBAL_BATCH)
    n = GLOBAL_BATCH // world
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


def full_params(model) -> dict:
    """The model's full parameters (stage 3 gathers them through state_dict)."""
    names = {n for n, _ in model.named_parameters()}
    return {k: v.detach().float().clone() for k, v in model.state_dict().items() if k in names}


def hf_loop(model, opt, steps: int = STEPS, clip: float = 0.0, halves: bool = False,
            zero: str = "model", hook=None) -> dict:  # fmt: skip
    """The HF Trainer v5 loop: loss.backward(), torch's clip, opt.step(), model.zero_grad()
    (never optimizer.zero_grad()). `halves`: two backward() of half batches before one step
    (accumulation nobody declared). `hook(step)` runs before each step's forward."""
    norms = []
    for step in range(steps):
        if hook is not None:
            hook(step)
        x, y = local_batch(step)
        parts = [(x[:4], y[:4]), (x[4:], y[4:])] if halves else [(x, y)]
        for xs, ys in parts:
            (loss_fn(model, xs, ys) / len(parts)).backward()
        if clip:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        opt.step()
        if zero == "model":
            model.zero_grad()
        else:
            opt.zero_grad()
    return {"params": full_params(model), "norms": norms}


_REF: dict = {}


def reference(steps: int = STEPS, clip: float = 0.0) -> dict:
    """Single-process torch.optim.AdamW on the global batch (seed-0 model)."""
    key = (steps, clip)
    if key not in _REF:
        model = make_model()
        opt = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=LR, betas=(0.9, 0.95),
            weight_decay=0.01,
        )  # fmt: skip
        norms = []
        for step in range(steps):
            x, y = batch(step, GLOBAL_BATCH)
            loss_fn(model, x, y).backward()
            if clip:
                norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
            opt.step()
            opt.zero_grad()
        _REF[key] = {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
                     "norms": norms}  # fmt: skip
    return _REF[key]


def error_of(fn) -> str:
    try:
        fn()
    except Exception as e:  # the test asserts the exact text
        return f"{type(e).__name__}: {e}"
    return "no error"


# -- item 1: model.to() / p.data = ... after the optimizer is built --------------------------
def moved_params(stage: int, how: str) -> dict:
    model, opt = build(stage)

    def move(step: int) -> None:
        if step not in (0, 2):
            return
        if how == "to":
            model.to(torch.float64).to(torch.float32)
        else:
            for p in model.parameters():
                p.data = p.data.clone()

    return hf_loop(model, opt, zero="optimizer", hook=move)


# -- item 2: optimizer built before init_process_group ---------------------------------------
def late_process_group(stage: int) -> str:
    # ranks started without WORLD_SIZE in the environment (mp.spawn passing the world to
    # init_process_group): with it set, construction itself refuses (tests/test_seams_ii.py)
    with mock.patch("torch.distributed.is_initialized", return_value=False), \
            mock.patch.dict("os.environ", {"WORLD_SIZE": "1"}):
        model = make_model()
        opt = zeroshard.ZeroOptimizer(model.parameters(), "adamw", stage=stage, lr=LR)
    return error_of(lambda: hf_loop(model, opt, steps=1))


# -- item 3: torch.nn.utils.clip_grad_norm_ ----------------------------------------------------
def torch_clip(stage: int, clip: float) -> dict:
    model, opt = build(stage)
    return hf_loop(model, opt, clip=clip, zero="optimizer")


def torch_clip_subset(stage: int) -> str:
    model, opt = build(stage)
    x, y = local_batch(0)
    loss_fn(model, x, y).backward()
    return error_of(lambda: torch.nn.utils.clip_grad_norm_(list(model.parameters())[:3], 1.0))


# -- item 4: model.zero_grad() only -------------------------------------------------------------
def model_zero_grad_only(stage: int, halves: bool) -> dict:
    model, opt = build(stage)
    return hf_loop(model, opt, halves=halves, zero="model")


def discarded_backward(stage: int) -> dict:
    """Each step first runs a backward whose gradients the loop throws away with
    `optimizer.zero_grad()` (a skipped batch), then the real one: its reductions may still be
    in flight when zero_grad() runs, and must not leak into the step."""
    model, opt = build(stage)
    for step in range(STEPS):
        x, y = local_batch(step + 100)
        loss_fn(model, x, y).mul(3.0).backward()
        opt.zero_grad()
        x, y = local_batch(step)
        loss_fn(model, x, y).backward()
        opt.step()
        opt.zero_grad()
    return {"params": full_params(model), "norms": []}


# -- item 5: a second optimizer over the same parameters -------------------------------------
def second_optimizer(kind: str) -> str:
    model = make_model()
    if kind == "ZeroOptimizer":
        opt = zeroshard.ZeroOptimizer(model.parameters(), "adamw", stage=2, lr=LR)
        err = error_of(lambda: zeroshard.ZeroOptimizer(model.parameters(), "adamw", stage=2))
    else:
        model, opt = build(2, model)
        err = error_of(lambda: build(2, model))
    del opt
    return err


def replaced_optimizer() -> dict:
    """The first optimizer is dropped, a new one is built: the new one trains exactly."""
    model = make_model()
    opt = zeroshard.ZeroOptimizer(model.parameters(), "adamw", stage=2, lr=LR)
    del opt
    model, opt = build(2, model)
    return hf_loop(model, opt, zero="optimizer")


# -- item 6: ranks seeded differently ------------------------------------------------------------
def seeded_per_rank(stage: int, under_init: bool) -> dict:
    rank, _ = rank_world()
    if under_init:
        with zeroshard.Init(config(3)):
            model = make_model(seed=rank)
    else:
        model = make_model(seed=rank)
    model, opt = build(stage, model)
    return hf_loop(model, opt, zero="optimizer")


def seeded_per_rank_drop_in(stage: int) -> dict:
    rank, _ = rank_world()
    model = make_model(seed=rank)
    model.pos.data = make_model(seed=0).pos.data  # frozen, not the optimizer's: the user's
    opt = zeroshard.ZeroOptimizer(
        [p for p in model.parameters() if p.requires_grad], "adamw", stage=stage, lr=LR,
        betas=(0.9, 0.95), weight_decay=0.01,
    )  # fmt: skip
    return hf_loop(model, opt, zero="optimizer")


# -- item 7: DistributedDataParallel around zeroshard -----------------------------------------
def inside_ddp(stage: int, how: str) -> str:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model()
    if how == "initialize_ddp":
        return error_of(lambda: build(stage, DDP(model)))
    if how == "drop_in":
        ddp = DDP(model)
        opt = zeroshard.ZeroOptimizer(ddp.parameters(), "adamw", stage=stage, lr=LR)
        return error_of(lambda: hf_loop(ddp, opt, steps=1))
    model, opt = build(stage, model)
    ddp = DDP(model)
    return error_of(lambda: hf_loop(ddp, opt, steps=1))


# -- item 8: meta model, all parameters frozen ---------------------------------------------------
def meta_or_frozen(kind: str) -> str:
    if kind == "meta":
        with torch.device("meta"):
            model = make_model()
        return error_of(lambda: zeroshard.ZeroOptimizer(model.parameters(), "adamw", stage=2))
    if kind == "meta3":
        with torch.device("meta"):
            model = make_model()
        return error_of(lambda: build(3, model))
    model = make_model()
    for p in model.parameters():
        p.requires_grad_(False)
    return error_of(lambda: zeroshard.ZeroOptimizer(model.parameters(), "adamw", stage=2))


# -- item 9: wall_clock_breakdown --------------------------------------------------------------
def wall_clock(stage: int) -> dict:
    model, opt = build(stage, wall_clock_breakdown=True, steps_per_print=2)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for step in range(5):
            x, y = local_batch(step)
            opt.backward(loss_fn(model, x, y))
            opt.step()
            opt.zero_grad()
    return {"printed": out.getvalue(), "last": opt.wall_clock.last}



def idle_workers_job() -> bool:
    """shutdown.wait_for_idle_workers against this rank's real gloo workers after a burst of
    async collectives."""
    from zeroshard import shutdown

    t = torch.ones(4096)
    for _ in range(20):
        dist.all_reduce(t, async_op=True).wait()
    return shutdown.wait_for_idle_workers(timeout=10.0)

"""The optimizer behaves like a torch optimizer: schedulers, state_dict, clipping, odd
parameters (unused, frozen), generic torch optimizers, sub-groups, and initialize()."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.distributed as dist
from torch import nn

import zeroshard
from tests.models import batch, loss_fn, make_model, param_groups
from tests.parity_jobs import GLOBAL_BATCH, assert_params_close


def _rank_world(group=None):
    if dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _local(step, group=None, n=GLOBAL_BATCH):
    rank, world = _rank_world(group)
    x, y = batch(step, n)
    k = n // world
    return x[rank * k : (rank + 1) * k], y[rank * k : (rank + 1) * k]


def _run(model, opt, steps, start=0, group=None, sched=None):
    for step in range(start, start + steps):
        x, y = _local(step, group)
        opt.backward(loss_fn(model, x, y))
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()


def job_state_dict_roundtrip(stage: int) -> float:
    """Train 3 steps, checkpoint, train 3 more; a fresh run that loads the checkpoint and trains
    the same 3 steps must end bit-identical. Returns the max difference."""

    def build():
        model = make_model()
        opt = zeroshard.ZeroOptimizer(
            param_groups(model), "adamw", stage=stage, lr=3e-3, reduce_bucket_size=700
        )
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return model, opt, sched

    model, opt, sched = build()
    _run(model, opt, 3, sched=sched)
    buf = io.BytesIO()
    ckpt = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
    torch.save(ckpt, buf)
    _run(model, opt, 3, start=3, sched=sched)
    want = {n: p.detach().clone() for n, p in model.named_parameters()}

    model2, opt2, sched2 = build()
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    _run(model2, opt2, 3, start=3, sched=sched2)
    return max((p.detach() - want[n]).abs().max().item() for n, p in model2.named_parameters())


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_state_dict_roundtrip(dist_run, stage):
    assert dist_run(2, job_state_dict_roundtrip, stage) == [0.0, 0.0]


def job_scheduler_and_clip(stage: int) -> dict:
    """A torch LambdaLR on the sharded optimizer and clip_grad_norm_ against plain torch."""
    model = make_model()
    ref = copy.deepcopy(model)
    opt = zeroshard.ZeroOptimizer(param_groups(model), "adamw", stage=stage, lr=3e-3)
    ropt = torch.optim.AdamW(param_groups(ref), lr=3e-3)
    lam = lambda s: 1.0 / (1 + s)  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    rsched = torch.optim.lr_scheduler.LambdaLR(ropt, lam)
    norms = []
    for step in range(4):
        x, y = _local(step)
        loss_fn(model, x, y).backward()
        norms.append(opt.clip_grad_norm_(0.5).item())
        opt.step()
        opt.zero_grad()
        sched.step()
        gx, gy = batch(step, GLOBAL_BATCH)
        loss_fn(ref, gx, gy).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5).item())
        ropt.step()
        ropt.zero_grad()
        rsched.step()
    return {
        "norms": norms,
        "lr": [g["lr"] for g in opt.param_groups],
        "rlr": [g["lr"] for g in ropt.param_groups],
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "ref": {n: p.detach().clone() for n, p in ref.named_parameters()},
    }


@pytest.mark.parametrize("stage", [0, 2])
def test_lr_scheduler_and_clip_grad_norm(dist_run, stage):
    for r in dist_run(2, job_scheduler_and_clip, stage):
        assert r["lr"] == r["rlr"]
        ours, theirs = r["norms"][0::2], r["norms"][1::2]
        assert ours == pytest.approx(theirs, rel=1e-5)
        assert ours[0] > 0.5  # clipping was active
        assert_params_close(r["params"], r["ref"])


class WithSkippedBranch(nn.Module):
    """`extra` is used only on even steps; `frozen` never trains."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.extra = nn.Linear(7, 7)
        self.b = nn.Linear(7, 3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)
        self.use_extra = True

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.use_extra:
            h = self.extra(h)
        return self.frozen(self.b(h))


def job_unused_params(stage: int, opt_cls=None) -> dict:
    rank, world = _rank_world()
    torch.manual_seed(0)
    model = WithSkippedBranch()
    ref = copy.deepcopy(model)
    if opt_cls is None:
        opt = zeroshard.ZeroOptimizer(model.parameters(), "sgd", stage=stage, lr=0.1, momentum=0.9)
        ropt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    else:
        opt = zeroshard.ZeroOptimizer(model.parameters(), opt_cls, stage=stage, lr=0.01)
        ropt = opt_cls(ref.parameters(), lr=0.01)
    frozen_before = model.frozen.weight.detach().clone()
    for step in range(6):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(8, 5, generator=g)
        model.use_extra = ref.use_extra = step % 2 == 0
        k = 8 // world
        model(x[rank * k : (rank + 1) * k]).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        ref(x).pow(2).mean().backward()
        # Flat-buffer semantics (DeepSpeed's and FSDP's too): a parameter without a gradient
        # this step is updated with a zero gradient, so momentum and decay still move it.
        for p in ref.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        ropt.step()
        ropt.zero_grad()
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "ref": {n: p.detach().clone() for n, p in ref.named_parameters()},
        "frozen_same": torch.equal(model.frozen.weight, frozen_before),
    }


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_params_unused_on_some_steps_train_on(dist_run, stage):
    for r in dist_run(2, job_unused_params, stage):
        assert r["frozen_same"]
        assert_params_close(r["params"], r["ref"])


@pytest.mark.parametrize("opt_cls", [torch.optim.RMSprop, torch.optim.Adagrad])
def test_generic_torch_optimizer_runs_on_the_shard(dist_run, opt_cls):
    for r in dist_run(2, job_unused_params, 2, opt_cls):
        assert_params_close(r["params"], r["ref"])


def job_subgroups() -> dict:
    """4 ranks as two independent 2-rank data-parallel groups, each its own optimizer."""
    rank = dist.get_rank()
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group = groups[rank // 2]
    model = make_model()
    opt = zeroshard.ZeroOptimizer(
        param_groups(model), "adamw", stage=2, lr=3e-3, process_group=group
    )
    _run(model, opt, 4, group=group)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def job_two_ranks() -> dict:
    model = make_model()
    opt = zeroshard.ZeroOptimizer(param_groups(model), "adamw", stage=2, lr=3e-3)
    _run(model, opt, 4)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_process_group_argument(dist_run):
    want = dist_run(2, job_two_ranks)[0]
    for got in dist_run(4, job_subgroups):
        assert_params_close(got, want)


def job_initialize(config: dict) -> dict:
    model = make_model()
    model, opt = zeroshard.initialize(model, config)
    losses = []
    for step in range(3):
        x, y = _local(step)
        loss = loss_fn(model, x, y)
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {
        "dtype": str(next(model.parameters()).dtype),
        "lr": opt.param_groups[0]["lr"],
        "stage": opt.stage,
        "scheduler": type(opt.lr_scheduler).__name__,
        "losses": losses,
    }


def test_initialize_from_config_dict(dist_run):
    config = {
        "train_batch_size": GLOBAL_BATCH,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.01}},
        "scheduler": {
            "type": "WarmupLR",
            "params": {"warmup_max_lr": 0.01, "warmup_num_steps": 4, "warmup_type": "linear"},
        },
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 1, "reduce_bucket_size": 1000},
    }
    for r in dist_run(2, job_initialize, config):
        assert r["dtype"] == "torch.bfloat16"
        assert r["stage"] == 1
        assert r["scheduler"] == "WarmupLR"
        # DeepSpeed numbering: after 3 scheduler steps the iteration is 2, lr = max * 2/4
        assert r["lr"] == pytest.approx(0.01 * 2 / 4)
        assert r["losses"][-1] < r["losses"][0]


def test_initialize_rejects_unsupported_values():
    with pytest.raises(zeroshard.ConfigError, match=r"zero_optimization\.reduce_scatter"):
        zeroshard.initialize(make_model(), {"zero_optimization": {"reduce_scatter": False}})


def test_checkpoint_from_another_layout_is_refused():
    model = make_model()
    opt = zeroshard.ZeroOptimizer(model.parameters(), "adamw", stage=1)
    sd = opt.state_dict()
    other = zeroshard.ZeroOptimizer(make_model().parameters(), "sgd", stage=1, lr=0.1)
    with pytest.raises(ValueError, match=r"rule: checkpoint 'adamw', this run 'sgd'"):
        other.load_state_dict(sd)
    sd["zeroshard"]["world_size"] = 4
    with pytest.raises(ValueError, match=r"world_size: checkpoint 4, this run 1"):
        zeroshard.ZeroOptimizer(make_model().parameters(), "adamw", stage=1).load_state_dict(sd)


def test_bad_arguments_name_the_problem():
    params = make_model().parameters()
    with pytest.raises(ValueError, match="stage must be 0, 1 or 2, got 5"):
        zeroshard.ZeroOptimizer(params, "adamw", stage=5)
    with pytest.raises(ValueError, match="unknown hyperparameter.*momentum.*adamw"):
        zeroshard.ZeroOptimizer(make_model().parameters(), "adamw", momentum=0.9)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        zeroshard.ZeroOptimizer(make_model().parameters(), "adafactor")


def job_undeclared_accumulation(stage: int) -> dict:
    """The plain-PyTorch accumulation loop: `loss.backward()` on 3 micro-batches, then one
    `step()`, without telling the optimizer about accumulation; must equal one big batch."""
    rank, world = _rank_world()
    model = make_model()
    ref = copy.deepcopy(model)
    opt = zeroshard.ZeroOptimizer(param_groups(model), "adamw", stage=stage, lr=3e-3)
    ropt = torch.optim.AdamW(param_groups(ref), lr=3e-3)
    n = 12
    for step in range(4):
        x, y = _local(step, n=n)
        for k in range(3):
            sl = slice(k * len(x) // 3, (k + 1) * len(x) // 3)
            (loss_fn(model, x[sl], y[sl]) / 3).backward()
        opt.step()
        opt.zero_grad()
        gx, gy = batch(step, n)
        loss_fn(ref, gx, gy).backward()
        ropt.step()
        ropt.zero_grad()
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "ref": {n: p.detach().clone() for n, p in ref.named_parameters()},
    }


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_accumulation_without_telling_the_optimizer(dist_run, stage):
    for r in dist_run(2, job_undeclared_accumulation, stage):
        assert_params_close(r["params"], r["ref"])


def test_each_dtype_reduces_in_its_own_default():
    """fp16 weights next to fp32 norms (a common mixed-precision layout): the fp16 gradients
    are held (and reduced) in fp16, the fp32 ones in fp32 — whichever dtype comes first."""
    half = nn.Linear(8, 8).half()
    norm = nn.LayerNorm(8)
    n16 = sum(p.numel() for p in half.parameters())
    n32 = sum(p.numel() for p in norm.parameters())
    opt = zeroshard.ZeroOptimizer(
        [*half.parameters(), *norm.parameters()], "adamw", stage=0, reduce_bucket_size=10**6
    )
    grads = opt.memory_report()["grads"]
    # stage 0, one process: each flat buffer pads to a multiple of 16 elements
    assert grads == -(-n16 // 16) * 16 * 2 + -(-n32 // 16) * 16 * 4


def job_add_param_group(stage: int) -> dict:
    """A group added after construction (progressive unfreezing) trains like torch's."""
    rank, world = _rank_world()
    torch.manual_seed(0)
    body, head = nn.Linear(6, 6), nn.Linear(6, 2)
    rbody, rhead = copy.deepcopy(body), copy.deepcopy(head)
    opt = zeroshard.ZeroOptimizer(body.parameters(), "adamw", stage=stage, lr=1e-2)
    ropt = torch.optim.AdamW(rbody.parameters(), lr=1e-2)
    for step in range(4):
        if step == 2:
            opt.add_param_group({"params": list(head.parameters()), "lr": 3e-2})
            ropt.add_param_group({"params": list(rhead.parameters()), "lr": 3e-2})
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
        k = 8 // world
        head(torch.tanh(body(x[rank * k : (rank + 1) * k]))).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if step < 2:
            head.zero_grad()  # not yet optimized: its plain .grad must not pile up
        rhead(torch.tanh(rbody(x))).pow(2).mean().backward()
        if step < 2:
            rhead.zero_grad()  # not yet in the reference optimizer: drop its grads too
        ropt.step()
        ropt.zero_grad()
    got = {**{f"b{n}": p for n, p in body.named_parameters()},
           **{f"h{n}": p for n, p in head.named_parameters()}}  # fmt: skip
    want = {**{f"b{n}": p for n, p in rbody.named_parameters()},
            **{f"h{n}": p for n, p in rhead.named_parameters()}}  # fmt: skip
    return {"params": {n: t.detach().clone() for n, t in got.items()},
            "ref": {n: t.detach().clone() for n, t in want.items()}}  # fmt: skip


@pytest.mark.parametrize("stage", [0, 2])
def test_add_param_group_after_construction(dist_run, stage):
    for r in dist_run(2, job_add_param_group, stage):
        assert_params_close(r["params"], r["ref"])

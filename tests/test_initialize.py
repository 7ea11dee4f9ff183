"""One `initialize` path for every stage: `process_group` and `model_parameters` (any iterable,
a generator too) are honoured at stages 0-3.

The process-group test splits 4 ranks into two groups of 2 at stage 3: each group must train
like single-process AdamW on its own data, and its `comm_report()` must be that of a 2-rank
run (the same bytes as the same job on a world of 2)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from tests.models import batch, loss_fn, make_model, param_groups

STEPS = 3
MICRO = 4
CONFIG = {
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95],
                                              "weight_decay": 0.1}},
    "zero_optimization": {"stage": 3, "allgather_bucket_size": 700,
                          "stage3_prefetch_bucket_size": 2500,
                          "stage3_param_persistence_threshold": 0},
}  # fmt: skip


def _train(model, opt, ref, ropt, seed: int, local_rank: int, local_world: int) -> list[dict]:
    comms = []
    for step in range(STEPS):
        x, y = batch(step, MICRO * local_world, seed=seed)
        sl = slice(local_rank * MICRO, (local_rank + 1) * MICRO)
        opt.backward(loss_fn(model, x[sl], y[sl]))
        opt.step()
        opt.zero_grad()
        comms.append(opt.comm_report())
        loss_fn(ref, x, y).backward()
        ropt.step()
        ropt.zero_grad()
    return comms


def job_groups(split: bool) -> dict:
    """split: 4 ranks as two groups of 2 (each group its own data); else the whole world."""
    import zeroshard

    torch.set_num_threads(1)
    rank = dist.get_rank()
    if split:
        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        g, pg = rank // 2, groups[rank // 2]
    else:
        g, pg = 0, None
    model = make_model()
    ref = copy.deepcopy(model)
    model, opt = zeroshard.initialize(
        model, CONFIG, model_parameters=param_groups(model), process_group=pg
    )
    ropt = torch.optim.AdamW(param_groups(ref), lr=3e-3, betas=(0.9, 0.95))
    comms = _train(model, opt, ref, ropt, seed=100 + g, local_rank=opt.rank, local_world=2)
    names = dict(model.named_parameters())
    return {
        "group": g,
        "world": (opt.rank, opt.world_size, opt.layout().world_size),
        "params": {k: v.clone() for k, v in model.state_dict().items() if k in names},
        "ref": {k: v.detach().clone() for k, v in ref.state_dict().items() if k in names},
        "comm": comms,
    }


def test_stage3_process_group_two_groups_of_two(dist_run):
    split = dist_run(4, job_groups, True)
    whole = dist_run(2, job_groups, False)
    for r in split:
        assert r["world"][1:] == (2, 2)
        for name, want in r["ref"].items():
            torch.testing.assert_close(r["params"][name], want, rtol=1e-5, atol=1e-6, msg=name)
    # the two groups trained on different data: their weights differ
    a, b = split[0]["params"], split[2]["params"]
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # each group of 2 sends exactly what a 2-rank world sends, step by step
    for r in split:
        want = whole[r["world"][0]]["comm"]
        assert r["comm"] == want
        assert r["comm"][-1]["all_gather"] > 0 and r["comm"][-1]["reduce_scatter"] > 0


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_generator_model_parameters_work_at_every_stage(stage):
    """A generator is read once and used by every stage: same result as the list."""
    import zeroshard

    cfg = copy.deepcopy(CONFIG)
    cfg["zero_optimization"]["stage"] = stage
    out = []
    for as_generator in (True, False):
        model = make_model()
        params = (p for p in model.parameters() if p.requires_grad)
        model, opt = zeroshard.initialize(
            model, cfg, model_parameters=params if as_generator else list(params)
        )
        want = sum(p.numel() for p in make_model().parameters() if p.requires_grad)
        assert sum(p.numel for p in opt.layout().params) == want  # every parameter trains
        x, y = batch(0, MICRO)
        opt.backward(loss_fn(model, x, y))
        opt.step()
        names = dict(model.named_parameters())
        out.append({k: v.clone() for k, v in model.state_dict().items() if k in names})
    assert out[0].keys() == out[1].keys() and len(out[0]) > 0
    for k in out[0]:
        torch.testing.assert_close(out[0][k], out[1][k], rtol=0, atol=0)

"""The DeepSpeed shim's engine on 2 gloo ranks without DeepSpeed installed: accumulation
boundaries, the update against torch SGD, and DeepSpeed's (None, None) for no checkpoint."""

import torch
from torch import nn

import zeroshard.integrations.deepspeed as deepspeed

CONFIG = {
    "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
    "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "zero_optimization": {"stage": 2},
    "kernel": "torch",
}  # fmt: skip


def _inputs(i: int) -> torch.Tensor:
    return torch.arange(8, dtype=torch.float32).reshape(2, 4) * (i + 1) / 10


def _engine_job(empty_dir: str) -> dict:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    ref = nn.Linear(4, 3)
    ref.load_state_dict(model.state_dict())
    engine, opt, loader, sched = deepspeed.initialize(model=model, config=CONFIG)
    boundaries = []
    for i in range(4):
        loss = engine(_inputs(i)).pow(2).sum()
        engine.backward(loss)
        boundaries.append(engine.is_gradient_accumulation_boundary())
        engine.step()
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1)
    for i in range(4):  # the same inputs on both ranks: the rank average is the same grad
        (ref(_inputs(i)).pow(2).sum() / 2).backward()
        if i % 2 == 1:
            sgd.step()
            sgd.zero_grad()
    return {
        "boundaries": boundaries, "steps": engine.global_steps, "micro": engine.micro_steps,
        "batch": engine.train_batch_size(), "loader": loader, "sched": sched,
        "world": engine.world_size, "lr": engine.get_lr(),
        "weight": engine.module.weight.detach().clone(), "ref": ref.weight.detach().clone(),
        "load": engine.load_checkpoint(empty_dir),
    }  # fmt: skip


def test_engine_steps_at_boundaries_like_torch(dist_run, tmp_path):
    for r in dist_run(2, _engine_job, str(tmp_path)):
        assert r["boundaries"] == [False, True, False, True]
        assert (r["steps"], r["micro"], r["batch"], r["world"]) == (2, 4, 8, 2)
        assert r["loader"] is None and r["sched"] is None and r["lr"] == [0.1]
        torch.testing.assert_close(r["weight"], r["ref"], rtol=1e-6, atol=1e-7)
        assert r["load"] == (None, None)

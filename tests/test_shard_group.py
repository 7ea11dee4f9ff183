"""The public shard-group type: a codec and a placement plug in without touching stage code,
and stage 3 enters the model through hooks only."""

from __future__ import annotations

import copy

import pytest
import torch

import zeroshard
from tests.models import batch, loss_fn, make_model, param_groups
from tests.parity_jobs import GLOBAL_BATCH, assert_params_close, reference
from zeroshard.shard import ShardGroup, StateCodec

STEPS = 10


class Bf16States:
    """A toy codec: Adam's moments stored in bf16 (half the bytes), fp32 while updating."""

    name = "bf16"

    def encode_new(self, working):
        return {k: [t.to(torch.bfloat16) for t in ts] for k, ts in working.items()}

    def decode(self, stored):
        return {k: [t.float() for t in ts] for k, ts in stored.items()}

    def encode(self, working, stored):
        for k, ts in stored.items():
            for s, w in zip(ts, working[k]):
                s.copy_(w)

    def stored_bytes(self, numel):
        return 2 * numel


class SeparateMaster:
    """A toy placement: master and state in buffers of their own, every gradient copied in
    before the update and the result copied out (what a host offload does)."""

    name = "separate"

    def __init__(self):
        self.grad_copies = 0

    def shares_params(self, param_dtype):
        return False

    def allocate(self, numel, like):
        return torch.zeros(numel, dtype=torch.float32, device=like.device)

    def stage_grads(self, grads):
        self.grad_copies += len(grads)
        return [g.to(torch.float32, copy=True) for g in grads]

    def write_params(self, master, params):
        for p, m in zip(params, master):
            p.view(-1).copy_(m)


def _train(stage: int, codec: str, placement: str) -> dict:
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) \
        if torch.distributed.is_initialized() else (0, 1)  # fmt: skip
    model = make_model()
    kw = {}
    if codec == "fp16":
        kw["codec"] = Bf16States()
    if placement == "separate":
        kw["placement"] = SeparateMaster()
    groups = param_groups(model, weight_decay=0.1)
    cfg = {
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 700,
                              "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95]}},
    }  # fmt: skip
    model, opt = zeroshard.initialize(model, cfg, model_parameters=groups, **kw)
    assert isinstance(opt.codec, StateCodec)
    assert all(isinstance(g, ShardGroup) for g in opt.shard_groups)
    for step in range(STEPS):
        x, y = batch(step, GLOBAL_BATCH)
        n = GLOBAL_BATCH // world
        loss_fn(model, x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]).backward()
        opt.step()
        opt.zero_grad()
    names = {n for n, _ in model.named_parameters()}
    states = [t for g in opt.shard_groups for t in g.stored_tensors()]
    shard_numel = sum(m.numel() for g in opt.shard_groups for m in g.master)
    return {
        "params": {k: v.float() for k, v in model.state_dict().items() if k in names},
        "memory": opt.memory_report(),
        "state_dtypes": sorted({str(t.dtype) for t in states}),
        "shard_numel": shard_numel,
        "master_is_param": [g.master_buffer is None for g in opt.shard_groups],
        "grad_copies": kw["placement"].grad_copies if "placement" in kw else 0,
        "pieces": sum(len(g.master) for g in opt.shard_groups),
    }


@pytest.mark.parametrize("stage", [2, 3])
def test_toy_codec_and_placement_plug_in_through_the_public_type(dist_run, stage):
    want = reference("adamw")
    plain = dist_run(2, _train, stage, "fp32", "device")
    fp16 = dist_run(2, _train, stage, "fp16", "device")
    apart = dist_run(2, _train, stage, "fp32", "separate")
    for r in range(2):
        assert_params_close(plain[r]["params"], want)
        # bf16 moments: the trajectory still follows torch.optim within bf16's precision
        assert_params_close(fp16[r]["params"], want, rtol=2e-3, atol=2e-4)
        assert fp16[r]["state_dtypes"] == ["torch.bfloat16"]
        # two Adam moments per shard element: 2 bytes each instead of 4
        n = fp16[r]["shard_numel"]
        assert plain[r]["memory"]["optimizer_states"] == 2 * 4 * n
        assert fp16[r]["memory"]["optimizer_states"] == 2 * 2 * n
        # a placement apart: the same trajectory bit for bit, a master of its own
        for k in plain[r]["params"]:
            torch.testing.assert_close(apart[r]["params"][k], plain[r]["params"][k],
                                       rtol=0, atol=0)  # fmt: skip
        assert all(plain[r]["master_is_param"]) and not any(apart[r]["master_is_param"])
        assert apart[r]["memory"]["master"] == 4 * apart[r]["shard_numel"]
        # every gradient piece was copied into the placement once per step
        assert apart[r]["grad_copies"] == STEPS * apart[r]["pieces"] > 0


def test_stage3_enters_through_hooks_and_leaves_the_model_as_it_was():
    model = make_model()
    before = (dict(model.__dict__), {m: (dict(m._forward_pre_hooks), dict(m._forward_hooks))
                                     for m in model.modules()})  # fmt: skip
    cfg = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    model, opt = zeroshard.initialize(model, cfg)
    assert "forward" not in model.__dict__  # no instance attribute shadows the class forward
    x, y = batch(0, 4)
    ref = make_model()
    torch.testing.assert_close(loss_fn(model, x, y), loss_fn(ref, x, y))
    with pytest.raises(RuntimeError, match="deepcopy of a stage-3 model"):
        copy.deepcopy(model)
    with pytest.raises((IndexError, RuntimeError)):  # raises inside a gathered module
        model(x + 10**6)
    # a forward that raised leaves nothing gathered, and the next one works
    torch.testing.assert_close(loss_fn(model, x, y), loss_fn(ref, x, y))
    engine = opt.sharding.engine
    assert engine.tracker.current == 0 and not engine.gathered_units()
    engine.remove()
    after = {m: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in model.modules()}
    assert after == before[1]
    assert model.__dict__.keys() == before[0].keys()

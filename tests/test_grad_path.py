"""Unit tests of the gradient path's parts: the in-flight queue (inflight.py) and the per-stage
reducers (grad_reducer.py + grad_strategies.py), on one process (collectives are local)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zeroshard.comm.collectives import Comm
from zeroshard.comm.inflight import InFlight
from zeroshard.shard.flat_buffer import FlatParams
from zeroshard.shard.grad_reducer import GradReducer


class FakeWork:
    def __init__(self, log: list, name: str) -> None:
        self.log, self.name = log, name

    def wait(self) -> None:
        self.log.append(("wait", self.name))


def test_inflight_completes_in_launch_order_and_runs_callbacks():
    log: list = []
    q = InFlight()
    a, b = object(), object()
    t = torch.zeros(3)
    q.add(FakeWork(log, "1"), tag=a, held=(t, None), on_done=lambda: log.append(("done", "1")))
    q.add(FakeWork(log, "2"), tag=b)
    q.add(FakeWork(log, "3"), tag=a)
    assert len(q) == 3 and q.held_tensors() == [t]
    q.wait_for(b)  # completes 1 then 2, leaves 3
    assert log == [("wait", "1"), ("done", "1"), ("wait", "2")] and len(q) == 1
    q.add(FakeWork(log, "4"))
    q.wait_below(1)
    assert log[-1] == ("wait", "3") and len(q) == 1
    q.drain()
    assert log[-1] == ("wait", "4") and len(q) == 0 and q.held_tensors() == []


def _params() -> list[nn.Parameter]:
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(*s)) for s in [(5, 7), (13,), (40, 3), (2,)]]


@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("overlap", [True, False])
def test_reducer_pieces_hold_the_accumulated_gradient(stage, overlap):
    params = _params()
    ref = [p.detach().clone().requires_grad_() for p in params]
    flat = FlatParams(params, num_shards=1, shard=0, bucket_numel=64)
    assert len(flat.buckets) == 3  # parameters in several buckets
    red = GradReducer(Comm(), stage, None, overlap_comm=overlap)
    red.add(flat)
    for k in range(2):  # two backwards before one step: gradients accumulate
        sum((p * (k + 1)).square().sum() for p in params).backward()
        sum((p * (k + 1)).square().sum() for p in ref).backward()
        assert all(p.grad is None for p in params)  # moved into the reducer's buffers
    red.finish()
    got = torch.cat(red.grad_pieces(0))
    want = torch.zeros(flat.numel)
    for s, r in zip(flat.slots, ref):
        want[s.offset : s.offset + s.numel] = r.grad.reshape(-1)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert red.sharded == (stage > 0)
    held = red.held_tensors()
    assert sum(t.numel() for t in held["grads"]) == (flat.shard_numel if stage == 2 else flat.numel)
    red.end_step()
    red.zero_grad()
    assert all(torch.count_nonzero(t) == 0 for t in held["grads"])
    assert red.held_tensors()["comm_buffers"] == []  # nothing held between steps


def test_reducer_rejects_stage_3():
    with pytest.raises(ValueError, match="stages 0, 1 and 2, got 3"):
        GradReducer(Comm(), 3, None)

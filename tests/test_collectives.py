"""The `Collectives` protocol: `Comm` and the estimator's `MetaComm` both implement it, and a
wire codec changes what travels (and what is counted), never where the result lands."""

from __future__ import annotations

import pytest
import torch

from zeroshard.comm import Collectives, Comm
from zeroshard.comm.meta import MetaComm


class Bf16Wire:
    """Send bf16, keep fp32: half the bytes; sums stay meaningful, so it is reducible."""

    reducible = True

    def encode(self, t):
        return t.to(torch.bfloat16)

    def decode(self, wire, out):
        out.copy_(wire)


class SignOnly(Bf16Wire):
    reducible = False


def _job() -> dict:
    comm = Comm()
    r, n = comm.rank, comm.world_size
    x = torch.arange(8, dtype=torch.float32) / 3 + r
    full = torch.empty(8 * n)
    comm.counter.snapshot()
    comm.all_gather(full, x, codec=Bf16Wire())
    gathered = comm.counter.snapshot()["all_gather"]
    comm.all_gather(full.clone(), x)
    plain = comm.counter.snapshot()["all_gather"]
    y = torch.arange(8 * n, dtype=torch.float32) / 7 + r
    out = torch.empty(8)
    comm.reduce_scatter(out, y, op="sum", codec=Bf16Wire())
    work = comm.all_reduce(z := torch.full((4,), float(r + 1)), op="sum", async_op=True,
                           codec=Bf16Wire())  # fmt: skip
    work.wait()
    try:
        comm.reduce_scatter(torch.empty(8), y, codec=SignOnly())
        refused = ""
    except ValueError as e:
        refused = str(e)
    return {"full": full, "gathered": gathered, "plain": plain, "out": out, "z": z,
            "refused": refused}  # fmt: skip


def test_wire_codec_changes_what_travels_not_the_result(dist_run):
    res = dist_run(2, _job)
    for r, got in enumerate(res):
        want = torch.cat([(torch.arange(8) / 3 + k).to(torch.bfloat16).float() for k in range(2)])
        assert torch.equal(got["full"], want)
        assert got["gathered"] * 2 == got["plain"] > 0  # bf16 on the wire: half the bytes
        y = [(torch.arange(16) / 7 + k).to(torch.bfloat16).float() for k in range(2)]
        torch.testing.assert_close(got["out"], (y[0] + y[1])[r * 8 : (r + 1) * 8],
                                   rtol=1e-2, atol=0)  # fmt: skip
        assert torch.equal(got["z"], torch.full((4,), 3.0))
        assert "cannot be summed on the wire" in got["refused"]


def test_meta_comm_counts_as_comm_does():
    meta = MetaComm(world_size=4, rank=1)
    assert isinstance(meta, Collectives) and isinstance(Comm(), Collectives)
    t = torch.empty(1000, device="meta")
    meta.all_gather(t, t[:250])
    meta.reduce_scatter(t[:250], t)
    meta.all_reduce(t)
    meta.broadcast(t, 0, counted=False)
    got = meta.counter.snapshot()
    ring = 3 / 4
    assert got["all_gather"] == got["reduce_scatter"] == 4000 * ring
    assert got["all_reduce"] == 2 * 4000 * ring and got["broadcast"] == 0
    meta.all_gather(t, t[:250], codec=Bf16Wire())
    assert meta.counter.snapshot()["all_gather"] == 2000 * ring


@pytest.mark.parametrize("async_op", [False, True])
def test_single_process_collectives_are_local(async_op):
    comm = Comm()
    assert not comm.active
    x = torch.arange(4.0)
    out = torch.empty(4)
    w = comm.all_gather(out, x, async_op=async_op, codec=Bf16Wire())
    if w is not None:
        w.wait()
    assert torch.equal(out, x) and comm.counter.snapshot()["total"] == 0


def _reduce_scatter_job(one_collective: bool) -> dict:
    """Two reductions in flight at once, waited in reverse order, in and out of place."""
    comm = Comm()
    r, n = comm.rank, comm.world_size
    inputs = {op: torch.randn(6 * n, generator=torch.Generator().manual_seed(10 * r + i))
              for i, op in enumerate(("sum", "avg", "max"))}  # fmt: skip
    sent = {op: t.clone() for op, t in inputs.items()}
    comm.counter.snapshot()
    kw = {"one_collective": one_collective}
    out_sum = torch.empty(6)
    w_sum = comm.reduce_scatter(out_sum, inputs["sum"], op="sum", async_op=True, **kw)
    own_avg = inputs["avg"].chunk(n)[r]
    w_avg = comm.reduce_scatter(own_avg, inputs["avg"], op="avg", async_op=True, **kw)
    w_avg.wait()
    w_sum.wait()
    out_max = torch.empty(6)
    comm.reduce_scatter(out_max, inputs["max"], op="max", **kw)
    # out of place, the exchange leaves the input as it was (a later backward adds into it)
    kept = one_collective or torch.equal(inputs["sum"], sent["sum"])
    return {"sent": sent, "kept": kept, "sum": out_sum, "avg": own_avg.clone(), "max": out_max,
            "report": comm.counter.snapshot()}  # fmt: skip


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("one_collective", [True, False])
def test_reduce_scatter_forms_agree(dist_run, world, one_collective):
    res = dist_run(world, _reduce_scatter_job, one_collective)
    for r, got in enumerate(res):
        mine = {op: [res[k]["sent"][op].chunk(world)[r] for k in range(world)]
                for op in ("sum", "avg", "max")}  # fmt: skip
        want_sum = mine["sum"][0].clone()
        want_avg = mine["avg"][0].clone()
        for k in range(1, world):
            want_sum += mine["sum"][k]
            want_avg += mine["avg"][k]
        if one_collective:  # gloo's ring sums in its own order
            torch.testing.assert_close(got["sum"], want_sum, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got["avg"], want_avg / world, rtol=1e-6, atol=1e-6)
        else:  # the exchange sums in rank order, whichever message arrived first
            assert torch.equal(got["sum"], want_sum)
            assert torch.equal(got["avg"], want_avg / world)
        assert torch.equal(got["max"], torch.stack(mine["max"]).amax(0))
        assert got["kept"]
        rep = got["report"]
        calls = 3 if one_collective else 3 * 2 * (world - 1)  # an isend and irecv per peer
        assert rep["reduce_scatter_calls"] == rep["calls"] == calls
        assert rep["reduce_scatter"] == 3 * 6 * world * 4 * (world - 1) // world

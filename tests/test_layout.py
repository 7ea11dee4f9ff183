"""The layout planner and the public shard layout (`opt.layout()`, `opt.shard_state()`):
pieces cover every parameter exactly once across ranks, and the values at each piece's
`shard_offset` in the owner's master concatenation are the parameter's values, at stages 0-3
on 1, 2 and 4 ranks (fp32 and bf16)."""

from __future__ import annotations

import pytest
import torch

from tests.models import batch, loss_fn, make_model, param_groups
from zeroshard.shard.layout import ALIGN, plan_buckets


def test_plan_buckets_never_cuts_a_parameter_and_pads_to_the_shards():
    plan = plan_buckets([10, 30, 5, 100, 7], num_shards=3, bucket_numel=40)
    assert [b.slots for b in plan.buckets] == [(0, 1), (2,), (3,), (4,)]
    assert [s.offset for s in plan.slots] == [0, 10, 48, 96, 240]
    assert [b.numel for b in plan.buckets] == [48, 48, 144, 48]  # multiples of 3 * ALIGN
    assert all(b.numel % (3 * ALIGN) == 0 for b in plan.buckets)
    assert plan.numel == 288 and plan.shard_numel == 96 and plan.param_numel == 152
    assert [b.shard_offset for b in plan.buckets] == [0, 16, 32, 80]


@pytest.mark.parametrize("shards", [1, 2, 3, 4])
def test_plan_pieces_cover_each_parameter_once(shards):
    numels = [1, 17, 33, 200, 5, 64]
    plan = plan_buckets(numels, num_shards=shards, bucket_numel=100)
    seen = [set() for _ in range(shards)]
    for slot in plan.slots:
        covered = []
        for piece in plan.pieces(slot):
            covered += range(piece.start, piece.start + piece.numel)
            pos = set(range(piece.shard_offset, piece.shard_offset + piece.numel))
            assert not pos & seen[piece.rank]  # no two pieces share a shard position
            seen[piece.rank] |= pos
            assert piece.shard_offset + piece.numel <= plan.shard_numel
        assert covered == list(range(slot.numel))


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def job_layout(stage: int, precision: str) -> dict:
    """Build, train two steps, return this rank's layout, master shards and full params."""
    torch.set_num_threads(1)
    import zeroshard

    rank, world = _rank_world()
    model = make_model()
    cfg = {
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        "zero_optimization": {
            "stage": stage, "reduce_bucket_size": 900, "allgather_bucket_size": 700,
            "stage3_param_persistence_threshold": 0,
        },
    }  # fmt: skip
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    model, opt = zeroshard.initialize(model, cfg, model_parameters=param_groups(model))
    for step in range(2):
        x, y = batch(step, 4 * world)
        opt.backward(loss_fn(model, x[rank * 4 : rank * 4 + 4], y[rank * 4 : rank * 4 + 4]))
        opt.step()
        opt.zero_grad()
    layout = opt.layout(model if stage < 3 else None)
    shards = []
    for g in layout.groups:
        st = opt.shard_state(g.index)
        cat = torch.cat([m.detach().reshape(-1) for m in st.master]) if st.master else None
        shards.append(cat.clone() if cat is not None else torch.empty(0))
        assert sum(m.numel() for m in st.master) == g.shard_numel
        assert set(st.state) == {"exp_avg", "exp_avg_sq"}
        assert st.step == 2
    full = {n: p.detach().clone() for n, p in model.state_dict().items()}
    return {"layout": layout, "shards": shards, "full": full, "rank": rank}


@pytest.mark.parametrize(
    "world,stage,precision",
    [(1, 0, "fp32"), (1, 2, "fp32"), (1, 3, "fp32"), (2, 0, "fp32"), (2, 1, "bf16"),
     (2, 2, "fp32"), (2, 3, "bf16"), (4, 1, "fp32"), (4, 2, "fp32"), (4, 3, "fp32")],
)  # fmt: skip
def test_layout_pieces_round_trip_the_parameters(dist_run, world, stage, precision):
    results = dist_run(world, job_layout, stage, precision)
    by_rank = {r["rank"]: r for r in results}
    layout = by_rank[0]["layout"]
    assert layout.stage == stage and layout.world_size == world
    model = make_model()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(p.name for p in layout.params) == sorted(trainable)
    assert [p.index for p in layout.params] == list(range(len(trainable)))
    full = by_rank[0]["full"]
    for p in layout.params:
        assert p.shape == tuple(full[p.name].shape)
        assert p.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
        assert sum(q.numel for q in p.pieces) == p.numel
        assert [q.start for q in p.pieces] == sorted(q.start for q in p.pieces)
        values = torch.empty(p.numel, dtype=torch.float32)
        covered = torch.zeros(p.numel, dtype=torch.int32)
        for q in p.pieces:
            shard = by_rank[q.rank]["shards"][p.shard_group]
            values[q.start : q.start + q.numel] = shard[q.shard_offset : q.shard_offset + q.numel]
            covered[q.start : q.start + q.numel] += 1
            assert (q.rank == 0) if stage == 0 else (0 <= q.rank < world)
        assert torch.all(covered == 1), p.name
        expected = full[p.name].reshape(-1)
        torch.testing.assert_close(values.to(expected.dtype), expected, rtol=0, atol=0)
    for r in results:  # each rank's local pieces are exactly its own
        mine = r["layout"].local_pieces()
        me = 0 if stage == 0 else r["rank"]
        assert all(q.rank == me for _, q in mine)
        assert sum(q.numel for _, q in mine) == sum(
            q.numel for p in r["layout"].params for q in p.pieces if q.rank == me
        )

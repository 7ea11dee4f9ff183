"""Unit tests of stage 3's parts on one process: the unit's life cycle (unit.py) and the
prefetch / reuse policy (prefetch.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from zeroshard.comm.collectives import Comm
from zeroshard.stage3.prefetch import backward_head, next_use_within, to_prefetch
from zeroshard.stage3.registry import unit_of
from zeroshard.stage3.unit import GatherTracker, ShardedUnit, UnitState


def _unit(persistent: bool = False) -> tuple[ShardedUnit, list[nn.Parameter], list[torch.Tensor]]:
    """A unit, its parameters (the caller must hold them: the unit holds them weakly) and
    their initial values."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(7))]
    values = [p.detach().clone() for p in params]
    unit = ShardedUnit(params, Comm(), 10, tracker=GatherTracker(), persistent=persistent)
    return unit, params, values


def test_unit_states_and_counters_follow_its_own_methods():
    u, params, values = _unit()
    assert unit_of(params[0]) is u and unit_of(torch.zeros(1)) is None
    assert u.state is UnitState.RELEASED and params[0].untyped_storage().nbytes() == 4
    assert params[0].shape == (5, 3) and params[1].numel() == 7  # placeholders: full shapes
    assert u.tracker.current == 0
    u.gather()
    assert u.state is UnitState.GATHERING
    u.wait()
    assert u.state is UnitState.GATHERED
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    assert u.tracker.current == u.full_bytes == u.numel * 4
    u.acquire()
    with pytest.raises(RuntimeError, match=r"release\(\) while in use \(1 users"):
        u.release()  # a bug in the caller: refused loudly
    assert u.release_if_unused() is False  # the engine's "release unless in use"
    assert u.state is UnitState.GATHERED and u.users == 1 and u.idle is False
    u.drop_use()
    with pytest.raises(RuntimeError, match="without a matching acquire"):
        u.drop_use()  # reference counts never go negative
    u.pin()
    with pytest.raises(RuntimeError, match="pinned=True"):
        u.release()  # pinned for backward
    assert u.release_if_unused() is False and u.state is UnitState.GATHERED
    u.unpin()
    u.retain()
    assert not u.idle
    u.release()  # retained only: released (retention is advice, not a use)
    assert u.state is UnitState.RELEASED and not u.retained and u.tracker.current == 0
    u.wait()  # wait on a released unit gathers it
    u.acquire()
    u.pin()
    u.discard()  # a forward that raised: everything reset
    assert (u.state, u.users, u.pinned, u.tracker.current) == (UnitState.RELEASED, 0, False, 0)


def test_persistent_unit_is_never_released():
    u, params, values = _unit(persistent=True)
    u.discard()
    assert u.release_if_unused() is False
    assert all(torch.equal(p, v) for p, v in zip(params, values))


def test_unit_shard_round_trips_through_write_back():
    u, params, values = _unit()
    u.wait()
    with torch.no_grad():
        params[1].add_(1.0)
    u.write_back()
    u.release()
    u.wait()
    assert torch.equal(params[1], values[1] + 1.0)
    assert torch.equal(params[0], values[0])


def _fake(numel: int, state=UnitState.RELEASED, persistent=False, idle=True):
    return SimpleNamespace(numel=numel, state=state, persistent=persistent, idle=idle)


def test_prefetch_takes_the_next_released_units_within_both_budgets():
    units = [_fake(10), _fake(20), _fake(30), _fake(5, persistent=True), _fake(40)]
    order = [0, 1, 2, 3, 4, 1]
    assert to_prefetch(order, 1, units, prefetch_numel=60, max_live_numel=1000) == [1, 2]
    assert to_prefetch(order, 1, units, prefetch_numel=1000, max_live_numel=1000) == [1, 2, 4]
    assert to_prefetch(order, 1, units, prefetch_numel=1000, max_live_numel=55) == [1, 2]
    units[1].state = UnitState.GATHERING  # already on its way and unused: counts as pending
    assert to_prefetch(order, 1, units, prefetch_numel=60, max_live_numel=1000) == [2]
    units[1].idle = False  # in use: counts as live only
    assert to_prefetch(order, 1, units, prefetch_numel=60, max_live_numel=1000) == [2]
    assert to_prefetch(order, 1, units, prefetch_numel=60, max_live_numel=50) == [2]
    assert to_prefetch(order, 1, units, prefetch_numel=60, max_live_numel=49) == []


def test_the_unit_being_fetched_is_in_use_not_pending():
    """Fetching unit 0 (gathered, not yet acquired): it takes none of the prefetch bucket, so
    the next unit is gathered behind it (it once did, and a block as large as the bucket
    stopped all prefetch: every block's gather waited in the open)."""
    units = [_fake(50, state=UnitState.GATHERING), _fake(50), _fake(50)]
    order = [0, 1, 2]
    assert to_prefetch(order, 1, units, prefetch_numel=60, max_live_numel=1000) == []
    assert to_prefetch(order, 1, units, prefetch_numel=60, max_live_numel=1000, current=0) == [1]
    assert to_prefetch(order, 1, units, prefetch_numel=60, max_live_numel=100, current=0) == [1]
    assert to_prefetch(order, 1, units, prefetch_numel=60, max_live_numel=99, current=0) == []


def test_prefetch_budget_ignores_resident_persistent_units():
    """A persistent unit is always gathered and never fetched: idle or not, it takes none of
    the prefetch bucket (it once did, which shrank prefetch by the persistent parameters)."""
    units = [_fake(10), _fake(20), _fake(30), _fake(25, persistent=True), _fake(40)]
    order = [0, 1, 2, 3, 4]
    units[3].state = UnitState.GATHERED  # resident, idle
    assert to_prefetch(order, 1, units, prefetch_numel=50, max_live_numel=1000) == [1, 2]
    assert to_prefetch(order, 1, units, prefetch_numel=50, max_live_numel=50) == [1, 2]


def test_backward_head_and_reuse_distance():
    units = [_fake(100), _fake(20), _fake(30), _fake(5, persistent=True)]
    assert backward_head([0, 1, 2], units, prefetch_numel=10) == {0}  # first, whatever size
    assert backward_head([3, 1, 2, 0], units, prefetch_numel=50) == {1, 2}
    # the first is in use as backward starts: one prefetch bucket more is kept behind it
    assert backward_head([0, 1, 2], units, prefetch_numel=50) == {0, 1, 2}
    assert backward_head([0, 1, 2], units, prefetch_numel=49) == {0, 1}
    assert backward_head([1, 2, 0], units, prefetch_numel=30) == {1, 2}
    assert backward_head(None, units, prefetch_numel=50) == set()
    order = [0, 1, 2, 1, 0]
    assert next_use_within(order, 1, 0, units, max_reuse_numel=50) is True  # 20 + 30 between
    assert next_use_within(order, 1, 0, units, max_reuse_numel=49) is False
    assert next_use_within(order, 5, 0, units, max_reuse_numel=50) is None


def test_a_shared_gather_fills_each_unit_and_frees_its_buffer_when_all_are_done():
    from zeroshard.stage3.coalesce import gather_coalesced

    tracker = GatherTracker()
    torch.manual_seed(1)
    params = [[nn.Parameter(torch.randn(4, 3))], [nn.Parameter(torch.randn(9)),
                                                  nn.Parameter(torch.randn(2))]]  # fmt: skip
    values = [[p.detach().clone() for p in ps] for ps in params]
    units = [ShardedUnit(ps, Comm(), 10, tracker=tracker) for ps in params]
    gather_coalesced(units, Comm(), tracker, limit=100)
    assert [u.state for u in units] == [UnitState.GATHERING] * 2
    buffer = sum(u.shard_numel for u in units) * 4
    assert tracker.current == buffer  # one rank-major buffer, no full buffers yet
    units[0].wait()
    assert all(torch.equal(p, v) for p, v in zip(params[0], values[0]))
    assert tracker.current == buffer + units[0].full_bytes
    units[1].discard()  # dropped before taking its part: the buffer goes with it
    assert tracker.current == units[0].full_bytes and units[1].state is UnitState.RELEASED
    units[0].release()
    assert tracker.current == 0

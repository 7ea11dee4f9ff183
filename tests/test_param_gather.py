"""Stages 1-2 with `overlap_param_gather`: `step()` returns with the updated parameters'
all-gather in flight, and each bucket is waited for by the first module that reads it
(shard/param_gather.py). Every check runs with `LazyGather` (tests/param_gather_jobs.py),
whose collectives happen only when waited for, so a forward that read a bucket before its
wait would train on the previous step's weights and fail the trajectory check."""

import pytest
import torch

import zeroshard
from tests import param_gather_jobs as jobs
from tests.models import make_model
from tests.parity_jobs import assert_params_close, reference
from zeroshard.config.schema import ConfigError, load_config


@pytest.fixture(scope="module")
def runs(dist_run):
    out = {}
    for stage in (1, 2):
        for overlap in (False, True):
            out[stage, overlap] = dist_run(2, jobs.train, stage, overlap)
    out[2, "gas"] = dist_run(2, jobs.train, 2, True, 2)
    out[2, "gas-sync"] = dist_run(2, jobs.train, 2, False, 2)
    return out


@pytest.mark.parametrize("stage", [1, 2])
def test_deferred_gather_trains_exactly_like_the_gather_at_step_end(runs, stage):
    want = reference("adamw")
    for sync, deferred in zip(runs[stage, False], runs[stage, True]):
        assert deferred["buckets"] > 3  # several buckets, each waited for on its own
        assert all(deferred["pending"])  # step() really returned with the gather in flight
        assert deferred["losses"] == sync["losses"]  # bit for bit, every step
        assert deferred["eval"] == sync["eval"]  # a no-grad forward right after a step
        assert_params_close(deferred["params"], want)
        assert all(torch.equal(deferred["params"][n], v) for n, v in sync["params"].items())
        # the same collectives, the same bytes (the ring formulas), only later
        assert deferred["comm"] == sync["comm"]


def test_deferred_gather_with_gradient_accumulation(runs):
    for sync, deferred in zip(runs[2, "gas-sync"], runs[2, "gas"]):
        assert deferred["losses"] == sync["losses"]
        assert all(torch.equal(deferred["params"][n], v) for n, v in sync["params"].items())


@pytest.mark.parametrize("in_place", [False, True])
def test_compiled_models_wait_for_the_whole_gather(dist_run, in_place):
    """torch.compile(model) and model.compile() run no per-module hooks inside the compiled
    forward: the wrapper's hook (or step() itself, in place) finishes the gather."""
    for r in dist_run(2, jobs.train_compiled, in_place):
        assert r[True] == r[False]  # bit for bit; stale chunks changed the losses by 8-14%


def test_a_read_outside_forward_needs_finish_param_gather(dist_run):
    for r in dist_run(2, jobs.stale_until_finished):
        # the parameters held wholly by the other rank are still old right after step()
        assert 0 < len(r["old"]) < r["trainable"], r
        assert r["old_after"] == []


@pytest.mark.parametrize("drop_in", [False, True])
def test_state_dicts_right_after_step_are_the_updated_ones(dist_run, drop_in):
    for r in dist_run(2, jobs.state_dicts_after_step, drop_in):
        assert r[True]["pending_before"] is True
        assert r[True]["pending_after"] is False  # model.state_dict() finished the gather
        assert r[True]["model"].keys() == r[False]["model"].keys()
        for k, v in r[False]["model"].items():
            assert torch.equal(r[True]["model"][k], v), k
        assert torch.equal(r[True]["exp_avg"], r[False]["exp_avg"])


@pytest.mark.parametrize("stage, why", [
    (0, "stage 0 updates every parameter on every rank: there is no parameter gather"),
    (3, r"stage 3 always gathers parameters ahead of use \(`stage3_prefetch_bucket_size`\)"),
])  # fmt: skip
def test_overlap_param_gather_outside_stages_1_and_2_is_an_error(stage, why):
    with pytest.raises(ConfigError, match=r"`zero_optimization.overlap_param_gather` = true "
                       rf"applies to stages 1 and 2 \(stage is {stage}\): {why}; remove the key"):
        load_config({"zero_optimization": {"stage": stage, "overlap_param_gather": True}})
    load_config({"zero_optimization": {"stage": stage, "overlap_param_gather": False}})
    assert load_config({"zero_optimization": {"stage": 2, "overlap_param_gather": True}}
                       ).zero_optimization.overlap_param_gather is True  # fmt: skip


@pytest.mark.parametrize("stage, model", [(2, False), (0, True)])
def test_the_drop_in_needs_the_model_and_a_sharded_stage(stage, model):
    net = make_model()
    with pytest.raises(ValueError, match=r"^overlap_param_gather applies to stages 1 and 2 and "
                       r"needs the model \(stage \d, model (not )?given\): ZeroOptimizer\(\.\.\., "
                       r"stage=2, overlap_param_gather=True, model=model\), so that "
                       r"model.state_dict\(\) waits for the gather$"):
        zeroshard.ZeroOptimizer(net.parameters(), "adamw", stage=stage, lr=1e-3,
                                overlap_param_gather=True, model=net if model else None)


def test_the_drop_in_refuses_a_model_that_does_not_hold_the_parameters():
    net, other = make_model(), make_model()
    with pytest.raises(ValueError, match=r"^overlap_param_gather: trainable parameter 0 of "
                       r"param group 0 \(shape \(67, 24\)\) is not a parameter of the model "
                       r"given as model=; pass the model these parameters belong to"):
        zeroshard.ZeroOptimizer(net.parameters(), "adamw", stage=2, lr=1e-3,
                                overlap_param_gather=True, model=other)


def test_overlap_param_gather_must_be_a_boolean():
    with pytest.raises(ConfigError, match=r"zero_optimization.overlap_param_gather"):
        load_config({"zero_optimization": {"stage": 2, "overlap_param_gather": "sometimes"}})

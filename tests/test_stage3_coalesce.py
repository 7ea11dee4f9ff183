"""Coalesced stage-3 collectives (stage3/coalesce.py) and unit grouping (stage3/grouping.py).

- grouping: "block" finds the repeated child class, class names pick those modules,
  "module" keeps one unit per module;
- on 2 gloo ranks, with buckets larger than the model, every grouping ends the run with
  torch.optim's parameters (also with gradient accumulation: the second micro-batch's
  coalesced reduction adds into the shard), and a step issues the collectives the schedule
  implies: ONE reduce-scatter for all gradients (persistent units included), one all-gather
  refreshing all persistent units, and the forward/backward gathers coalesced, far fewer
  than one per unit; bytes are those of the uncoalesced schedule (coalescing moves no more).
"""

from __future__ import annotations

import pytest
from torch import nn

from tests.models_stage3 import build
from tests.stage3_jobs import assert_close, many, reference
from zeroshard.stage3.grouping import fetchers, unit_roots

BIG = {"reduce_bucket_size": 1_000_000, "stage3_prefetch_bucket_size": 1_000_000,
       "stage3_param_persistence_threshold": 300}  # fmt: skip
JOBS = [
    ("core", "adamw", "fp32", {**BIG, "stage3_unit_grouping": "module"}),
    ("core", "adamw", "fp32", {**BIG}),  # "block", the default
    ("core", "adamw", "fp32", {**BIG, "gas": 2}),
    ("tied_flinear", "adamw", "fp32", {**BIG, "stage3_unit_grouping": ["Block"]}),
    ("core", "adamw", "fp32", {"stage3_unit_grouping": "module", "reduce_bucket_size": 1,
                               "stage3_prefetch_bucket_size": 1,
                               "stage3_param_persistence_threshold": 300}),
]  # fmt: skip


def test_block_grouping_finds_the_repeated_child_class():
    model = build("core")
    assert list(unit_roots(model, "block").values()) == ["blocks.0", "blocks.1"]
    assert list(unit_roots(model, ["Block"]).values()) == ["blocks.0", "blocks.1"]
    assert list(unit_roots(model, ["LayerNorm"]).values()) == [
        "blocks.0.ln1", "blocks.0.ln2", "blocks.1.ln1", "blocks.1.ln2", "ln_f"]  # fmt: skip
    assert unit_roots(model, "module") == {}
    assert unit_roots(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Conv1d(3, 1, 1)), "block") == {}


def test_a_block_unit_is_gathered_by_the_block_and_a_tied_weight_by_its_user():
    model = nn.Sequential(nn.Embedding(5, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)),
                          nn.Linear(4, 5, bias=False))  # fmt: skip
    model[2].weight = model[0].weight
    block = [p for p in model[1].parameters()]
    embed = [model[0].weight]
    units = [type("U", (), {"params": block})(), type("U", (), {"params": embed})()]
    param_units = {id(p): units[0] for p in block} | {id(embed[0]): units[1]}
    got = fetchers(model, units, param_units)
    assert got[model[1]] == [units[0]] and got[model[1][0]] == [] and got[model[1][1]] == []
    assert got[model[0]] == [units[1]] and got[model[2]] == [units[1]]  # tied: both fetch it


@pytest.fixture(scope="module")
def runs(dist_run):
    return dist_run(2, many, JOBS)


def test_every_grouping_matches_torch_optim(runs):
    for i, (model_name, rule, _, kw) in enumerate(JOBS):
        want = reference(model_name, rule)
        for rank_results in runs:
            r = rank_results[i]
            assert r["leaked_bytes"] == 0
            worst = assert_close(r["params"], want)
            print(f"{model_name} {kw}: max abs error {worst:.2e}")


def test_collectives_per_step_coalesced(runs):
    """Buckets larger than the model. Forward: the first unit fetched (the embedding, used
    again by the tied head) is gathered on its own, so its wait is not queued behind the
    others, and the prefetch issued at its fetch covers every other unit: TWO all-gathers.
    Backward starts with the units kept from forward (all fit in one
    prefetch bucket): none. After backward: ONE reduce-scatter of every gradient, persistent
    units included. Step: ONE all-gather refreshing all persistent units, ONE all-reduce
    (global grad norm / inf check). Per micro-batch with accumulation."""
    world, elem = 2, 4
    for rank_results in runs:
        for i in (0, 1, 2, 3):
            r = rank_results[i]
            c = r["comm"]
            micro = 2 if "gas" in JOBS[i][3] else 1
            trainable = sum(n for _, n, _, t in r["units"] if t)
            assert any(p and t for _, _, p, t in r["units"])  # persistent units take part
            assert c["reduce_scatter_calls"] == micro, (JOBS[i], c)
            assert c["all_gather_calls"] == 2 * micro + 1, (JOBS[i], c)
            assert c["all_reduce_calls"] == 1 and c["calls"] == 3 * micro + 2
            # coalescing moves the same bytes: every gradient element once per micro-batch
            assert c["reduce_scatter"] == micro * trainable * elem * (world - 1) // world
        # the uncoalesced schedule (1-element buckets): more than one collective per unit
        per_unit = rank_results[4]
        assert per_unit["comm"]["calls"] > 2 * len(per_unit["units"])

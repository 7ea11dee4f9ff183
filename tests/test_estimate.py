"""`zeroshard.estimate.model_states` against what the optimizer really holds and sends.

For the test models at stages 0-3 on 1, 2 and 4 gloo ranks, fp32 and bf16: the estimate of every
memory category equals `memory_report()` after two steps exactly (the issue asks for 2%), the
stage-3 gathered-parameter peak is within 10% of the engine's tracker and bytes sent per step
within 2% of `comm_report()` (all exact today: stage 3 runs the engine itself on the meta
device over an example input, so a block called three times per forward and a tied embedding
used through `F.linear` are traced, not assumed). One pool job per world size trains every
(model, precision, stage) combination, so the whole file costs three jobs.

And the ZeRO paper's figures: 7e9 parameters, mixed-precision Adam, 8 ranks.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import zeroshard
from tests.models import batch, example_input, loss_fn, make_model, param_groups
from tests.models_stage3 import FACTORIES, ReusedBlock, TiedFLinear
from zeroshard.accounting import zero_formula
from zeroshard.estimate.model_states import CATEGORIES, Numel, estimate
from zeroshard.estimate.stage3 import REGISTRATION, SYNTHESIZED

GLOBAL_BATCH = 8
WORLDS = (1, 2, 4)
PRECISIONS = ("fp32", "bf16")
MODELS = {"tiny": make_model, "tied_f_linear": TiedFLinear, "reused_block": ReusedBlock}
# "tiny" trains two param groups (decay / no decay): one flat buffer per group
GROUPED = ("tiny",)


def groups_of(name: str, model: torch.nn.Module) -> list[dict] | None:
    return param_groups(model) if name in GROUPED else None


def config(precision: str, stage: int) -> dict:
    """Small buckets (several per model), a prefetch of 2500 elements, LayerNorms persistent;
    fp32 releases after every use, bf16 keeps the default reuse distance."""
    zo = {
        "stage": stage, "reduce_bucket_size": 700, "allgather_bucket_size": 700,
        "stage3_prefetch_bucket_size": 2500, "stage3_param_persistence_threshold": 300,
        "stage3_max_reuse_distance": 0 if precision == "fp32" else 1_000_000_000,
    }  # fmt: skip
    return {"zero_optimization": zo, "bf16": {"enabled": precision == "bf16"}}


# without an example input: every model above and every one of tests/models_stage3.py
NO_INPUT = {**MODELS, **{f"stage3_{k}": f for k, f in FACTORIES.items()}}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return NO_INPUT[name]()


def stages_on(world: int, name: str) -> tuple[int, ...]:
    """4 ranks on 2 CPU cores are slow to drive: there the corner-case models (whose stage
    0-2 layouts are checked on 1 and 2 ranks) run stage 3 only."""
    return (3,) if world == 4 and name != "tiny" else (0, 1, 2, 3)


def measure_job() -> dict:
    """Every (model, precision, stage) on this rank: memory after 2 steps, bytes sent in the
    second step, stage 3's gathered peak over the second step (forward and backward)."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    out: dict = {}
    for name in MODELS:
        for precision in PRECISIONS:
            for stage in stages_on(world, name):
                model = build(name)
                model, opt = zeroshard.initialize(model, config(precision, stage),
                                                  model_parameters=groups_of(name, model))
                peak = None
                for step in range(2):
                    x, y = batch(step, GLOBAL_BATCH)
                    n = GLOBAL_BATCH // world
                    x, y = x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
                    if stage == 3:
                        opt.sharding.engine.tracker.reset_peak()
                    opt.backward(loss_fn(model, x, y))
                    opt.step()
                    opt.zero_grad()
                    if stage == 3:
                        peak = opt.sharding.engine.tracker.peak
                out[name, precision, stage] = {
                    "memory": opt.memory_report(), "comm": opt.comm_report(), "peak": peak,
                }  # fmt: skip
    return out


@pytest.fixture(scope="module")
def measured(dist_run):
    return {world: dist_run(world, measure_job) for world in WORLDS}


def _close(est: float, got: float, tol: float) -> bool:
    return abs(est - got) <= tol * got if got else est == 0


@pytest.mark.parametrize("world,name", [(w, n) for w in WORLDS for n in MODELS])
def test_estimate_equals_memory_report(measured, world, name):
    worst: dict[str, float] = {}
    figures = []  # stage 3, rank 0: (precision, peak estimated/measured, sent est./measured)
    for precision in PRECISIONS:
        with torch.device("meta"):
            model = build(name)
        stages = stages_on(world, name)
        ests = estimate(model, world_size=world, config=config(precision, 0), stages=stages,
                        model_parameters=groups_of(name, model), example_input=example_input())
        for est in ests:
            stage = est.stage
            for rank, ranks in enumerate(measured[world]):
                got = ranks[name, precision, stage]
                want = est.per_rank[rank if stage == 3 else 0]
                for cat in CATEGORIES:
                    g, e = got["memory"][cat], want[cat]
                    worst[cat] = max(worst.get(cat, 0.0), abs(e - g) / g if g else float(e != 0))
                    # the issue allows 2%; the planner makes it exact
                    assert e == g, (precision, stage, rank, cat, e, g)
                c = got["comm"]["total"]
                worst["comm"] = max(worst.get("comm", 0.0), abs(est.comm_bytes - c) / max(c, 1))
                assert _close(est.comm_bytes, c, 0.02), (precision, stage, rank, est.comm_bytes, c)
                if stage == 3:
                    p = got["peak"]
                    worst["peak"] = max(worst.get("peak", 0.0), abs(est.gathered_peak - p) / p)
                    assert est.schedule == "traced", est.schedule
                    assert _close(est.gathered_peak, p, 0.10), (precision, rank, est, p)
                    if rank == 0:
                        figures.append(f"{precision} peak {est.gathered_peak}/{p} "
                                       f"sent {est.comm_bytes}/{c}")
    print(f"{name} on {world} rank(s): largest deviation per category {worst}; stage 3 "
          f"estimated/measured bytes: {'; '.join(figures)}")


class _DataDependent(nn.Module):
    """A forward that reads a value (`.item()`): it cannot run on the meta device."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(40, 40)
        self.b = nn.Linear(40, 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h) if h.sum().item() > 0 else h


def peak_job() -> dict:
    """Stage 3's gathered peak of every NO_INPUT model on this rank, fp32 and bf16: the
    largest over steps 2 and 3 (the first records the order prefetch replays; SkipsBlock
    runs its second block every other step), as the estimate takes the largest steady one."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    out: dict = {}
    first: dict = {}  # a factory listed twice (a stage-3 model under two names) runs once
    for name in NO_INPUT:
        for precision in PRECISIONS:
            key = (NO_INPUT[name], name in GROUPED, precision)
            if key in first:
                out[name, precision] = out[first[key]]
                continue
            first[key] = (name, precision)
            model = build(name)
            model, opt = zeroshard.initialize(model, config(precision, 3),
                                              model_parameters=groups_of(name, model))
            tracker, peaks = opt.sharding.engine.tracker, []
            for step in range(3):
                x, y = batch(step, GLOBAL_BATCH)
                n = GLOBAL_BATCH // world
                tracker.reset_peak()
                opt.backward(loss_fn(model, x[rank * n : (rank + 1) * n],
                                     y[rank * n : (rank + 1) * n]))  # fmt: skip
                opt.step()
                opt.zero_grad()
                peaks.append(tracker.peak)
            out[name, precision] = max(peaks[1:])
    return out


@pytest.fixture(scope="module")
def peaks_on_2(dist_run):
    return dist_run(2, peak_job)


@pytest.mark.parametrize("name", NO_INPUT)
def test_no_input_estimate_of_the_gathered_peak(peaks_on_2, name):
    """Without an example input the engine runs on token ids synthesized from the model's
    embedding: its gathered peak is within 10% of a real 2-rank run's (exact today) for a
    block called three times, checkpointed blocks and a tied `F.linear` head too, where a
    replay of registration order ran 0.42x (reused block) and 0.56x (non-reentrant
    checkpoint) of the measured peak."""
    figures = []
    for precision in PRECISIONS:
        with torch.device("meta"):
            model = build(name)
        (est,) = estimate(model, world_size=2, config=config(precision, 3), stages=(3,),
                          model_parameters=groups_of(name, model))  # fmt: skip
        assert est.schedule == SYNTHESIZED + "token ids of shape (1, 8) for Embedding"
        for rank, ranks in enumerate(peaks_on_2):
            got = ranks[name, precision]
            assert _close(est.gathered_peak, got, 0.10), (precision, rank, est.gathered_peak, got)
        figures.append(f"{precision} {est.gathered_peak}/{peaks_on_2[0][name, precision]}")
    print(f"{name}: no-input estimate/measured peak bytes, rank 0: {'; '.join(figures)}")


class _TwoInputs(nn.Module):
    """The test model behind a forward with two required arguments: nothing to synthesize."""

    def __init__(self) -> None:
        super().__init__()
        self.core = make_model()

    def forward(self, tokens: torch.Tensor, scale: float) -> torch.Tensor:
        return self.core(tokens) * scale


class _Convolutional(nn.Module):
    """A 32x32-image classifier: its input is found among the synthesized image sides."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.head = nn.Linear(8 * 30 * 30, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(images)).flatten(1))


def test_synthesized_input_of_a_convolutional_model():
    """The first image side the forward accepts (32: 224 fails at the linear head) is traced,
    and gives what the same image given as the example input gives."""
    cfg = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 100,
                                 "stage3_prefetch_bucket_size": 100}}  # fmt: skip
    kw = {"world_size": 2, "config": cfg, "stages": (3,)}
    with torch.device("meta"):
        synth, given = _Convolutional(), _Convolutional()
    (s,) = estimate(synth, **kw)
    (g,) = estimate(given, **kw, example_input=torch.zeros(1, 3, 32, 32))
    assert s.schedule == SYNTHESIZED + "images of shape (1, 3, 32, 32) for Conv2d"
    assert g.schedule == "traced"
    assert (s.gathered_peak, s.comm_bytes) == (g.gathered_peak, g.comm_bytes)
    assert s.gathered_peak >= 4 * 8 * 30 * 30 * 10  # the head is gathered whole


def test_without_a_traced_run_the_replay_says_so():
    """A forward with nothing to synthesize, or one that fails on meta: the engine runs on
    every module called once in registration order and `schedule` says why. For a model
    whose modules run once each in that order it equals the traced run."""
    cfg = config("fp32", 3)
    kw = {"world_size": 2, "config": cfg, "stages": (3,)}
    with torch.device("meta"):
        two, plain = _TwoInputs(), _TwoInputs()
    (replayed,) = estimate(two, **kw)
    assert replayed.schedule == REGISTRATION + (
        "no example input was given, and none could be synthesized for this forward")
    (traced,) = estimate(plain, **kw, example_input=(example_input(), 1.0))
    assert traced.schedule == "traced"
    assert (replayed.gathered_peak, replayed.comm_bytes) == (traced.gathered_peak,
                                                             traced.comm_bytes)  # fmt: skip
    with torch.device("meta"):
        dd, dd_plain = _DataDependent(), _DataDependent()
    (failed,) = estimate(dd, **kw, example_input=torch.zeros(3, 40))
    assert failed.schedule.startswith(REGISTRATION + "the traced run failed (")
    assert "item" in failed.schedule, failed.schedule
    (plain_dd,) = estimate(dd_plain, **kw)
    assert plain_dd.schedule.startswith(REGISTRATION + "no example input was given, and the "
                                        "forward ran on no synthesized one (features of shape "
                                        "(1, 40) for Linear: ")  # fmt: skip
    assert (failed.gathered_peak, failed.comm_bytes) == (plain_dd.gathered_peak,
                                                         plain_dd.comm_bytes)  # fmt: skip
    assert failed.gathered_peak > 0
    # the model is left as it came: meta parameters of the original shapes, no gradients
    assert [(p.device.type, p.shape, p.grad) for p in dd.parameters()] == [
        ("meta", p.shape, None) for p in dd_plain.parameters()]  # fmt: skip


def test_zero_paper_7b_on_8_ranks():
    """ZeRO paper, 7.5B example scaled to Ψ = 7e9, N = 8, mixed-precision Adam (K = 12):
    stage 0 16Ψ, stage 1 4Ψ + 12Ψ/N, stage 2 2Ψ + 14Ψ/N, stage 3 16Ψ/N = 14.0 GB."""
    psi, n = 7_000_000_000, 8
    ests = estimate(Numel(psi), world_size=n, precision="fp16", optimizer="adam")
    totals = [e.bytes["total"] / 1e9 for e in ests]
    assert totals == pytest.approx([112.0, 38.5, 26.25, 14.0], abs=1e-3)
    for e in ests:
        f = zero_formula(psi, e.stage, n, param_bytes=2, grad_bytes=2)
        for cat in ("params", "grads", "master", "optimizer_states"):
            assert e.bytes[cat] == pytest.approx(f[cat], rel=1e-6), (e.stage, cat)


def test_config_file_written_for_another_world_size(tmp_path):
    """Batch sizes fixed for 8 ranks do not stop an estimate for 2 (they size activations,
    which are not estimated); bucket sizes from the file are used."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({
        "train_batch_size": 32, "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"reduce_bucket_size": 700},
    }))  # fmt: skip
    with torch.device("meta"):
        model = make_model()
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    (s1,) = estimate(model, world_size=2, config=str(path), stages=(1,))
    buckets = -(-numel // 700) + 1  # bucket boundaries never cut a parameter: a few more
    assert 4 * numel <= s1.bytes["params"] <= 4 * (numel + buckets * 2 * 16)
    (big,) = estimate(model, world_size=2, stages=(1,))  # one 5e8-element bucket
    assert big.bytes["params"] == 4 * (-(-numel // 32) * 32) < s1.bytes["params"]

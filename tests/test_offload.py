"""CPU offload (`offload_optimizer`, `offload_param`): the same trajectory as without offload
(2 gloo ranks, 20 steps, clipping active), master and state counted in host memory and not on
the device, every copy in and out made, and bad settings refused on every rank by key path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.models import make_model, param_groups
from tests.offload_jobs import config, resume, train
from tests.offload_jobs import config_error as _config_error
from zeroshard.cli.main import main
from zeroshard.estimate.model_states import CATEGORIES, estimate
from zeroshard.shard.offload import HostOffload

STEPS = 20


@pytest.mark.parametrize(
    "stage, offload_param, dtype",
    [(1, False, "fp32"), (2, False, "fp32"), (2, False, "bf16"), (3, True, "fp32")],
)
def test_offload_trains_exactly_as_without(dist_run, stage, offload_param, dtype):
    plain = dist_run(2, train, stage, False, False, dtype, STEPS)
    off = dist_run(2, train, stage, True, offload_param, dtype, STEPS)
    for r in range(2):
        p, o = plain[r], off[r]
        assert len(o["losses"]) == STEPS
        np.testing.assert_allclose(o["losses"], p["losses"], rtol=1e-6, atol=0)
        for k in p["params"]:
            torch.testing.assert_close(o["params"][k], p["params"][k], rtol=1e-6, atol=0)
        n = o["shard_numel"]
        # master (fp32) and Adam's two fp32 moments live in host memory, none on the device
        assert o["host"]["master"] == 4 * n and o["host"]["optimizer_states"] == 2 * 4 * n
        assert o["device"]["master"] == 0 and o["device"]["optimizer_states"] == 0
        # the reduced gradients were staged in a host fp32 buffer of the shard's size
        assert o["host"]["grads"] == 4 * n
        assert o["device"]["grads"] == p["memory"]["grads"]
        assert o["memory"]["host"] == o["host"]["total"] > 0
        assert o["memory"]["device"] == o["device"]["total"]
        assert p["memory"]["host"] == 0 and p["memory"]["device"] == p["memory"]["total"]
        # separate buffers: the master never shares the parameters' storage
        assert o["master_apart"] and o["master_device"] == ["cpu"]
        # every master piece out once per step; every gradient piece came in during backward
        # as its bucket's reduction landed (from step 1 on: step 0 records the launch order
        # and reduces in step()), so step() copied none
        assert o["copies"] == (0, STEPS * o["pieces"]) and o["pieces"] > 0
        assert o["copied_at_step"] == [0] * STEPS
        assert all(n > 0 for n in o["landed_in_backward"][1:]), o["landed_in_backward"]
        if offload_param:
            # the parameter shards live in host memory; nothing is left on the device
            assert o["host"]["params"] == p["memory"]["params"] > 0
            assert o["device"]["params"] == 0
        else:
            assert o["host"]["params"] == 0
    # the estimator's offload rule gives exactly what memory_report() measured
    for run, offload in ((plain, False), (off, True)):
        with torch.device("meta"):
            model = make_model()
        cfg = config(stage, offload, offload and offload_param, dtype)
        (est,) = estimate(model, world_size=2, config=cfg, stages=(stage,),
                          model_parameters=param_groups(model))  # fmt: skip
        for r in range(2):
            want = est.per_rank[r if stage == 3 else 0]
            for key in (*CATEGORIES, "total", "device", "host"):
                assert want[key] == run[r]["memory"][key], (offload, r, key)


# (stage, accumulation, thrown-away backward) cases: stage 1 with accumulation reduces in
# step() only; "partial" leaves buckets that land nothing after the zeroing (copied by step())
EDGES = [(1, 1, "partial"), (1, 2, "full"), (2, 2, "partial"), (3, 2, "full")]


@pytest.mark.parametrize("stage, accumulation, thrown", EDGES)
def test_offload_edges_match_without_offload_bit_for_bit(dist_run, stage, accumulation, thrown):
    """Gradient accumulation, clipping (always on), a backward thrown away with zero_grad(),
    and a step skipped for nan gradients: the offloaded run's losses and parameters are the
    run without offload's, bit for bit, with the copies made as the reductions landed."""
    steps, kw = 5, {"accumulation": accumulation, "thrown": thrown, "nan_step": 3}
    plain = dist_run(2, train, stage, False, False, "fp32", steps, None, *kw.values())
    off = dist_run(2, train, stage, True, False, "fp32", steps, None, *kw.values())
    for p, o in zip(plain, off):
        np.testing.assert_array_equal(o["losses"], p["losses"])
        assert np.isnan(o["losses"][3]) and o["skipped_steps"] == p["skipped_steps"] == 1
        for k in p["params"]:
            assert torch.equal(o["params"][k], p["params"][k]), k
        if stage == 1 and accumulation > 1:  # stages 0-1 reduce once, inside step()
            assert o["landed_in_backward"] == [0] * steps and o["copied_at_step"] == [0] * steps
        else:
            assert all(n > 0 for n in o["landed_in_backward"][2:]), o["landed_in_backward"]
        if thrown == "partial":
            # the zeroing forgot the thrown-away backward's copies: the buckets that landed
            # nothing afterwards were copied by step() (zeros, as on the device)
            assert o["copied_at_step"][1] > 0
            assert o["copied_at_step"][:1] + o["copied_at_step"][2:] == [0] * (steps - 1)
            assert o["landed_before_step"][1] < o["landed_before_step"][2]
        else:
            assert o["copied_at_step"] == [0] * steps


def test_landed_ranges_map_onto_the_staging_buffer_and_a_reset_forgets_them():
    """`HostOffload` alone: landings that cover a piece in parts, span two pieces or come
    from a temporary fill the host buffer; what did not land whole is copied by
    `stage_grads`; after `grads_reset` everything is copied again."""
    grad = torch.arange(20, dtype=torch.float32)
    pieces = [grad[2:8], grad[8:15]]  # a group's pieces: views of one gradient buffer
    off = HostOffload()
    off.track_grads(pieces)
    off.grads_landed(grad[0:5])  # the first 3 elements of piece 0
    off.grads_landed(grad[5:10], torch.full((5,), -1.0))  # values from a temporary
    host = off.stage_grads(pieces)
    assert off.copies_landed == 3 and off.copies_in == 1  # piece 1 only partly landed
    assert host[0].tolist() == [2, 3, 4, -1, -1, -1]
    assert host[1].tolist() == grad[8:15].tolist()  # copied now, whole
    off.grads_landed(grad[8:15])
    grad.mul_(10)  # written after the landings: a reset follows any such write
    off.grads_reset()
    host = off.stage_grads(pieces)
    assert off.copies_in == 3 and torch.equal(torch.cat(host), grad[2:15])
    off.grads_landed(grad)  # one landing covers both pieces
    assert off.copies_landed == 6 and off.stage_grads(pieces) and off.copies_in == 3
    at_step = HostOffload(overlap_grads=False)
    at_step.track_grads(pieces)
    at_step.grads_landed(grad)
    assert at_step.copies_landed == 0 and torch.equal(torch.cat(at_step.stage_grads(pieces)),
                                                      grad[2:15])  # fmt: skip
    assert at_step.copies_in == 2


def test_offload_with_8bit_states(dist_run):
    """The AdamW8bit codec's fused step runs on the host pieces: same losses, codes and
    absmax in host memory only."""
    adam8 = {"type": "AdamW8bit", "params": {"lr": 3e-3, "block_size": 64, "min_8bit_size": 256}}
    plain = dist_run(2, train, 2, False, False, "fp32", 8, adam8)
    off = dist_run(2, train, 2, True, False, "fp32", 8, adam8)
    for p, o in zip(plain, off):
        assert o["losses"] == p["losses"]
        assert o["host"]["optimizer_states"] == p["memory"]["optimizer_states"] > 0
        assert o["device"]["optimizer_states"] == 0


@pytest.mark.parametrize("stage", [2, 3])
def test_offloaded_runs_resume_from_checkpoints_and_state_dicts(dist_run, tmp_path, stage):
    got = dist_run(2, resume, stage, str(tmp_path / "ckpt"), stage == 3)
    for r in got:
        for name in ("into_plain", "into_offload", "state_dict", "plain_state_dict"):
            assert r[name] == r["straight"], name  # bit for bit
        assert len(r["straight"]) == 3


BAD = [
    ({"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": "/local_nvme"}},
     '`zero_optimization.offload_optimizer.device` = "nvme" is not supported by zeroshard yet '
     '(offload to NVMe is not built); use "cpu", or "none" for no offload'),
    ({"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "nvme"}},
     '`zero_optimization.offload_param.device` = "nvme" is not supported by zeroshard yet '
     '(offload to NVMe is not built); use "cpu", or "none" for no offload'),
    ({"stage": 2, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}},
     "`zero_optimization.offload_param` is a stage-3 option (stage is 2): only stage 3 "
     "partitions parameters; remove the key or use stage 3"),
    ({"stage": 3, "offload_param": {"device": "cpu"}},
     "`zero_optimization.offload_param` needs `zero_optimization.offload_optimizer` = "
     '{"device": "cpu"} too: the update runs where the parameter shards live'),
    ({"stage": 2, "offload_optimizer": {"device": "gpu"}},
     '`zero_optimization.offload_optimizer.device` = "gpu": must be "cpu" (host memory) or '
     '"none" (no offload)'),
]  # fmt: skip


@pytest.mark.parametrize("zo, message", BAD)
def test_bad_offload_settings_fail_on_every_rank_by_key_path(dist_run, zo, message):
    got = dist_run(2, _config_error, zo)
    assert got == [f"invalid zeroshard config: {message}"] * 2


def test_offload_and_a_placement_argument_are_refused_together():
    zo = {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    assert _config_error(zo, placement=True) == (
        "zero_optimization.offload_optimizer is set and a placement was passed to "
        "initialize(): give one or the other"
    )


def test_estimate_cli_shows_device_and_host_bytes(capsys, tmp_path):
    """Ψ = 7e9, N = 8, fp16 Adam, HF's ZeRO-3 offload template: at stage 3 only the fp16
    gradient shard stays on the device; the fp32 master, Adam's moments, the staged fp32
    gradients and the fp16 parameter shard live in host memory."""
    cfg = tmp_path / "offload.json"
    cfg.write_text(json.dumps({"zero_optimization": {
        "stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True}}}))  # fmt: skip
    argv = ["estimate", "--params", "7e9", "--world-size", "8", "--precision", "fp16",
            "--optimizer", "adam", "--config", str(cfg), "--device-memory", "40GB"]  # fmt: skip
    assert main([*argv, "--json"]) == 0
    stages = json.loads(capsys.readouterr().out)["stages"]
    gb = 1_000_000_000
    # stage 0 has nothing to offload; stages 1-2 offload the optimizer, stage 3 the params too
    assert [s["bytes"]["device"] for s in stages] == [112 * gb, 28 * gb, 15.75 * gb, 1.75 * gb]
    assert [s["bytes"]["host"] for s in stages] == [0, 14 * gb, 14 * gb, 15.75 * gb]
    assert [s["fits"] for s in stages] == [False, True, True, True]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(ln for ln in lines if ln.lstrip().startswith("stage"))
    assert "device total      host  sent/step" in head
    row3 = next(ln for ln in lines if ln.split()[:1] == ["3"])
    assert "1.75 GB  15.75 GB" in row3

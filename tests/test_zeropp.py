"""ZeRO++ at stage 3 (qwZ, hpZ, qgZ) on 4 gloo ranks seen as 2 nodes of 2 (LOCAL_WORLD_SIZE=2):
hpZ alone trains bit for bit as plain stage 3; the quantized parts stay within 1% of its loss
on a small LM and cut the bytes that cross nodes to the paper's quarter or less; every byte
counted equals the formula; checkpoints are the plain stage-3 ones; bad topologies fail on
every rank with the key's name."""

from __future__ import annotations

import math

import pytest
import torch

from tests.zeropp_jobs import (
    ALL3,
    bad_topology_job,
    bytes_job,
    exact_state_dict_job,
    hierarchical_job,
    lm_runs,
    resume_job,
    save_job,
    secondary_memory_job,
    train_nodes,
)

N, L = 4, 2  # ranks, ranks per node
M = N // L  # nodes
HPZ = {"zero_hpz_partition_size": 2}


def _wire(numel: int, bits: int, block: int) -> int:
    """Bytes of `numel` elements on the wire: codes padded to 16 bytes, fp32 scales."""
    codes = numel if bits == 8 else (numel + 1) // 2
    return -(-codes // 16) * 16 + 4 * math.ceil(numel / block)


OFFLOAD = {"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}


@pytest.mark.parametrize("model,precision,kw", [
    ("core", "fp32", {}), ("ckpt", "fp32", {}), ("reused", "fp32", {}),
    ("core", "fp32", {"gas": 2}), ("core", "bf16", {}), ("core", "fp32", OFFLOAD),
])  # fmt: skip
def test_hpz_alone_is_plain_stage3_bit_for_bit(dist_run, model, precision, kw):
    """Backward (and recomputation, and the second micro-batch) re-gathers from the node's
    secondary shards: the same values forward used, so the same gradients (bf16 parameters
    and offloaded shards too)."""
    jobs = [(model, "adamw", precision, {**kw}), (model, "adamw", precision, {**kw, **HPZ})]
    results = dist_run(N, train_nodes, L, jobs)
    for plain, hpz in results:
        assert plain["losses"] == hpz["losses"]
        for name, want in plain["params"].items():
            assert torch.equal(hpz["params"][name], want), name
        assert hpz["leaked_bytes"] == 0
        # the backward gathers moved inside the node: fewer bytes cross nodes, none lost
        assert hpz["comm"]["inter_node"] < plain["comm"]["inter_node"]
        assert hpz["comm"]["all_gather"] < plain["comm"]["all_gather"]


def test_zeropp_small_lm_within_1pct_and_bytes(dist_run):
    """96 steps of a small GPT on the demo's bigram language: the mean loss of the last 8 steps
    with qwZ, qgZ and all three within 1% of plain stage 3 (measured: 0.12%, 0.13%, 0.18%; at
    step 64, while the loss still falls fast, all three were 0.95% behind); with all three,
    inter-node bytes per step <= 0.3x and total bytes <= 0.5x plain stage 3's."""
    variants = [{}, {"zero_quantized_weights": True}, {"zero_quantized_gradients": True}, ALL3]
    runs = dist_run(N, lm_runs, L, variants, 96)[0]
    last = [sum(r["losses"][-8:]) / 8 for r in runs]
    plain = runs[0]
    assert plain["losses"][-1] < 0.7 * plain["losses"][0]  # it learned
    for v, r, loss in zip(variants[1:], runs[1:], last[1:]):
        rel = abs(loss / last[0] - 1)
        print(f"{v}: last-8 loss {loss:.4f} vs {last[0]:.4f} ({rel:.2%}); "
              f"inter {r['comm'][-1]['inter_node']} total {r['comm'][-1]['total']} bytes")
        assert rel <= 0.01, v
        assert r["losses"] != plain["losses"]  # quantization did change something
    inter = [r["comm"][-1]["inter_node"] for r in runs]
    total = [r["comm"][-1]["total"] for r in runs]
    print(f"all three / plain: inter-node {inter[3] / inter[0]:.3f}, "
          f"total {total[3] / total[0]:.3f}")
    assert inter[3] <= 0.3 * inter[0]
    assert total[3] <= 0.5 * total[0]


def test_zeropp_inter_node_bytes_equal_the_formula(dist_run):
    """One bucket per unit and no prefetch: forward sends each unit's shard as int8 codes to
    the N-L ranks of the other node; backward's gathers (hpZ) and qgZ's first hop stay in the
    node; qgZ's second hop sends (M-1) int4 rows of every unit's shard, in one collective;
    the gradient statistics' all-reduce sends 2 float64 to the other node's ranks."""
    out = dist_run(N, bytes_job)[0]
    units = [u for u in out["units"] if not u[2]]
    assert all(buckets == 1 for _, buckets, _ in units)
    forward = sum(_wire(shard, 8, 128) * (N - L) for shard, _, _ in units)
    grads = (M - 1) * _wire(sum(shard for shard, _, _ in units), 4, 64)
    stats = 2 * 16 * (N - L) // N
    for report in out["comm"]:
        assert report["inter_node"] == forward + grads + stats
        assert report["inter_node"] + report["intra_node"] == report["total"]


def test_qgz_reduce_scatter_against_the_exact_mean(dist_run):
    """Each hop's error is at most half a step of its block's int4 scale; the result is the
    same in place and out of place, and waited in any order (fixed summation order); the
    inter-node hop is posted as soon as the intra-node one landed; bytes are the formula's; a
    nan on one rank reaches the owner of its chunk, and only that owner."""
    results = dist_run(N, hierarchical_job, 7)
    chunk = 1000
    for rank, r in enumerate(results):
        err = (r["out"] - r["exact"]).abs().max().item()
        scale = max(res["exact"].abs().max().item() for res in results)
        assert err < 0.15 * scale * 2, (rank, err)  # int4: 1/14 of a block's max per hop
        assert err > 0  # quantized: not the exact mean
        assert torch.equal(r["out"], r["in_place"])
        intra = (L - 1) * _wire(M * chunk, 4, 64)
        inter = (M - 1) * _wire(chunk, 4, 64)
        report = r["report"]
        assert report["reduce_scatter"] == 2 * (intra + inter)
        assert report["inter_node"] == 2 * inter
        assert r["finite"] == (rank != 3)
        assert r["posted_early"] and r["same"]


def test_qgz_with_accumulation_clipping_and_a_bad_step(dist_run):
    """qgZ under gradient accumulation and global-norm clipping stays within 1% of plain
    stage 3 (loss and gradient norm); an inf loss on one rank skips that step on every rank."""
    qgz = {"zero_quantized_gradients": True}
    plain, quant = dist_run(N, lm_runs, L, [{}, qgz], 24, gas=2)[0]
    assert abs(sum(quant["losses"][-4:]) / sum(plain["losses"][-4:]) - 1) <= 0.01
    # int4 rounding noise moves the pre-clipping norm by up to 5.3% on a step, 1.3% on
    # average (measured); the loss follows plain stage 3 within 0.25%
    dev = [abs(b / a - 1) for a, b in zip(plain["norms"], quant["norms"])]
    assert max(dev) <= 0.08 and sum(dev) / len(dev) <= 0.03
    assert max(plain["norms"]) > 1.0  # clipping (max norm 1.0) was active
    bad = dist_run(N, lm_runs, L, [qgz], 4, bad_step=2)
    for (r,) in bad:
        assert r["skipped"] == 1
        assert r["params"][2] == r["params"][1]  # the bad step changed nothing
        assert r["params"][3] != r["params"][2]  # the next one trained
        assert all(math.isfinite(x) for x in r["params"][3])


def test_hpz_secondary_bytes_in_memory_report(dist_run):
    """Between forward and the update each rank holds 1/P of every unit forward released,
    reported as `hpz_secondary` (and inside `params`); the units kept gathered into backward
    (backward starts with them) hold none; the update drops them (the values changed)."""
    for r in dist_run(N, secondary_memory_job):
        assert r["expected"] > 0 and 0 < r["released"] < r["units"]
        assert r["during"]["hpz_secondary"] == r["expected"]
        assert r["during"]["params"] >= r["expected"]
        assert r["after"]["hpz_secondary"] == 0
        assert r["during"]["params"] - r["after"]["params"] == r["expected"]


def test_qwz_state_dict_is_exact(dist_run):
    """Forward computes with dequantized weights, but a state dict gathers the exact shards."""
    assert all(dist_run(N, exact_state_dict_job))


@pytest.mark.parametrize("src,dst", [(ALL3, {}), ({}, ALL3)])
def test_zeropp_checkpoint_resumes_at_any_world_size_with_or_without_it(dist_run, tmp_path,
                                                                         src, dst):  # fmt: skip
    """The wire codecs are not state: a ZeRO++ run's checkpoint loads into plain stage 3 at 2
    ranks (and a plain one into ZeRO++ at 4), every saved tensor re-saved bit for bit; the
    resumed loss continues the saved run's within 1%."""
    from tests.ckpt_jobs import full_state

    root, again = str(tmp_path / "a"), str(tmp_path / "b")
    dist_run(N, save_job, root, src, 2)
    world = 2 if dst == {} else N
    resumed = dist_run(world, resume_job, root, again, dst, 3)[0]
    before, after = full_state(root), full_state(again)
    assert sorted(before) == sorted(after) and len(before) > 10
    for k in before:
        assert torch.equal(before[k], after[k]), k
    straight = dist_run(N, lm_runs, L, [src], 5)[0][0]["losses"]
    assert max(abs(a / b - 1) for a, b in zip(resumed, straight[2:])) <= 0.01


@pytest.mark.parametrize("local,zero,key", [
    (2, {"zero_hpz_partition_size": 4}, "zero_hpz_partition_size"),
    (3, {"zero_quantized_gradients": True}, "LOCAL_WORLD_SIZE=3"),
])  # fmt: skip
def test_zeropp_bad_topology_fails_on_every_rank(dist_run, local, zero, key):
    """An hpZ partition wider than a node, or nodes of unequal size, is one clear error at
    construction on every rank (before any subgroup exists: nothing waits for a peer)."""
    messages = dist_run(N, bad_topology_job, local, zero)
    for rank, msg in enumerate(messages):
        assert msg.startswith(f"rank {rank}:") and key in msg, msg


def test_estimate_shows_intra_and_inter_node_bytes_as_measured(dist_run):
    """`zeroshard estimate` (the library call behind it) runs the engine with the same ZeRO++
    collectives on the meta device: bytes sent per step, inter-node bytes and hpZ's secondary
    bytes equal a real 2x2 run's `comm_report()` / `memory_report()`."""
    from tests.zeropp_jobs import LM, lm_config
    from zeroshard.demo.tiny_gpt import GPTConfig, TinyGPT
    from zeroshard.estimate.model_states import estimate

    measured = dist_run(N, lm_runs, L, [{}, ALL3], 3)[0]
    memory = dist_run(N, secondary_memory_job)[0]
    for zero, run in zip(({}, ALL3), measured):
        with torch.device("meta"):
            model = TinyGPT(GPTConfig(**LM))
        tokens = torch.zeros(1, 8, dtype=torch.long, device="meta")
        (est,) = estimate(model, world_size=N, config=lm_config(**zero), stages=(3,),
                          example_input=tokens, local_world_size=L)  # fmt: skip
        sent = run["comm"][-1]
        print(f"{zero or 'plain'}: estimated {est.comm_bytes} / {est.comm_inter_node} "
              f"inter; measured {sent['total']} / {sent['inter_node']}")
        assert est.comm_bytes == sent["total"]
        assert est.comm_inter_node == sent["inter_node"]
    with torch.device("meta"):
        model = TinyGPT(GPTConfig(**LM))
    hpz = lm_config(zero_hpz_partition_size=2, stage3_max_reuse_distance=0)
    (est,) = estimate(model, world_size=N, config=hpz, stages=(3,), local_world_size=L)
    assert est.hpz_secondary == memory["during"]["hpz_secondary"] > 0


def test_run_refuses_an_hpz_partition_wider_than_a_node_before_launching(capsys, tmp_path):
    """`zeroshard run --nproc 2 --nnodes 2` checks the config against 2 ranks per node, with
    the runtime's rule (check-config's), and launches nothing."""
    import json
    from pathlib import Path

    from zeroshard.cli.main import main

    cfg = json.loads((Path(__file__).parents[1] / "configs" / "zero3_zeropp.json").read_text())
    cfg["zero_optimization"]["zero_hpz_partition_size"] = 4
    path = tmp_path / "hpz4.json"
    path.write_text(json.dumps(cfg))
    rc = main(["run", "--nproc", "2", "--nnodes", "2", "--config", str(path), "train.py"])
    err = capsys.readouterr().err
    assert rc != 0 and "`zero_optimization.zero_hpz_partition_size` = 4" in err, err
    assert "2 ranks of a node" in err


def test_zeropp_bf16_parameters(dist_run):
    """bf16 parameters (fp32 master, fp32 reduction): all three parts quantize from and
    dequantize into bf16; the loss follows plain bf16 stage 3 within 1% over 32 steps."""
    bf16 = {"enabled": True}
    plain, zpp = dist_run(N, lm_runs, L, [{}, ALL3], 32, bf16=bf16)[0]
    rel = abs(sum(zpp["losses"][-8:]) / sum(plain["losses"][-8:]) - 1)
    print(f"bf16, all three: last-8 loss {rel:.2%} off plain stage 3")
    assert rel <= 0.01 and zpp["losses"] != plain["losses"]
    assert zpp["comm"][-1]["inter_node"] <= 0.3 * plain["comm"][-1]["inter_node"]

"""Universal checkpoints across state codecs: fp32 AdamW states load into AdamW8bit runs
(quantized with the destination group's block size) and back (dequantized), at another world
size and stage; an AdamW8bit param group keeps its own block size, and a load honours it
(requantizing); rule changes whose states differ are refused naming them."""

from __future__ import annotations

import torch

from tests import codec_convert_jobs as C
from tests.ckpt_jobs import full_state
from tests.models import make_model
from zeroshard import quant8 as Q

SAVE_AT, MORE = 4, 4
SIGNED = {"exp_avg": True, "exp_avg_sq": False}
# decay group (matrices): block 128; no-decay group (norms, biases: 24-73 elements): 8-bit
# too, with block 16
GROUPS = [{"block_size": 128, "min_8bit_size": 500}, {"block_size": 16, "min_8bit_size": 24}]


def _rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) > 0
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def _whole(results: list[dict]) -> dict[str, dict[str, torch.Tensor]]:
    """Every rank's loaded pieces, put together per parameter (8-bit pieces start on blocks,
    so their absmax concatenate too)."""
    parts: dict[str, list] = {}
    for r in results:
        for name, pieces in r["loaded"].items():
            parts.setdefault(name, []).extend(pieces)
    out = {}
    for name, pieces in parts.items():
        pieces.sort(key=lambda x: x[0])
        out[name] = {k: torch.cat([p[k] for _, p in pieces]) for k in pieces[0][1]}
    return out


def _no_decay() -> set[str]:
    return {n for n, p in make_model().named_parameters() if p.requires_grad and p.dim() < 2}


def test_fp32_adamw_at_2_ranks_resumes_as_adamw8bit_at_4_ranks(dist_run, tmp_path):
    src = str(tmp_path / "fp32")
    cont = dist_run(2, C.job_save_and_continue, src, "adamw", 2, SAVE_AT, MORE)[0]
    got = dist_run(4, C.job_resume, src, "adamw8bit", 3, MORE)
    saved, loaded, n8 = full_state(src), _whole(got), 0
    for name, st in loaded.items():
        if Q.uses_8bit(saved[f"master/{name}"].numel(), C.MIN8):
            n8 += 1  # exactly the fp32 state quantized whole with the destination's block
            for m, signed in SIGNED.items():
                codes, absmax = Q.quantize_blockwise(saved[f"state.{m}/{name}"], signed, C.BLOCK)
                assert torch.equal(st[f"{m}_codes"], codes), (name, m)
                assert torch.equal(st[f"{m}_absmax"], absmax), (name, m)
        else:  # the fp32 fallback moves as it is
            for m in SIGNED:
                assert torch.equal(st[m], saved[f"state.{m}/{name}"]), (name, m)
    assert n8 == 9
    err = _rel(got[0]["losses"], cont)
    print(f"fp32 (2 ranks, stage 2) -> 8-bit (4 ranks, stage 3): resumed loss max rel {err:.2e}")
    assert err <= 1e-3


def test_adamw8bit_at_4_ranks_resumes_as_fp32_adamw_at_2_ranks(dist_run, tmp_path):
    src = str(tmp_path / "q8")
    cont = dist_run(4, C.job_save_and_continue, src, "adamw8bit", 2, SAVE_AT, MORE)[0]
    got = dist_run(2, C.job_resume, src, "adamw", 1, MORE)
    saved, loaded, n8 = full_state(src), _whole(got), 0
    for name, st in loaded.items():
        for m, signed in SIGNED.items():
            if f"state.{m}_codes/{name}" in saved:  # exactly the dequantized 8-bit state
                n8 += m == "exp_avg"
                want = Q.dequantize_blockwise(saved[f"state.{m}_codes/{name}"],
                                              saved[f"state.{m}_absmax/{name}"], signed, C.BLOCK)
            else:
                want = saved[f"state.{m}/{name}"]
            assert torch.equal(st[m], want), (name, m)
    assert n8 == 9 and sorted(loaded[name]) == ["exp_avg", "exp_avg_sq"]
    err = _rel(got[0]["losses"], cont)
    print(f"8-bit (4 ranks, stage 2) -> fp32 (2 ranks, stage 1): resumed loss max rel {err:.2e}")
    assert err <= 1e-3


def test_block_size_per_param_group_trains_like_the_reference(dist_run):
    ref = C.reference_groups(6, GROUPS)
    got = dist_run(2, C.job_train_groups, 6, GROUPS)
    no_decay = _no_decay()
    assert ref["n8"] == 9 + len(no_decay)  # every norm and bias 8-bit too, in blocks of 16
    seen = set()
    for r in got:
        assert _rel(r["losses"], ref["losses"]) <= 1e-4
        for name, p in r["params"].items():
            want = ref["params"][name]
            assert (p - want).abs().max() <= 1e-3, name
        for key, (numel, nabs) in r["pieces"].items():
            block = GROUPS[1 if key.split("@")[0] in no_decay else 0]["block_size"]
            assert nabs == Q.num_blocks(numel, block), key
            seen.add(key.split("@")[0])
    assert no_decay <= seen


def test_load_honours_the_destination_groups_block_size(dist_run, tmp_path):
    src = str(tmp_path / "q8")
    cont = dist_run(2, C.job_save_and_continue, src, "adamw8bit", 2, SAVE_AT, MORE)[0]
    got = dist_run(4, C.job_resume, src, "adamw8bit", 2, MORE, group_codecs=GROUPS)
    assert got[0]["blocks"] == [128, 16]  # the saved block size (64) does not replace them
    saved, loaded, no_decay = full_state(src), _whole(got), _no_decay()
    for name, st in loaded.items():
        block = GROUPS[1 if name in no_decay else 0]["block_size"]
        for m, signed in SIGNED.items():
            if name in no_decay:  # saved fp32 (under min_8bit_size 500): quantized
                values = saved[f"state.{m}/{name}"]
            else:  # saved in blocks of 64: dequantized, quantized in blocks of 128
                values = Q.dequantize_blockwise(saved[f"state.{m}_codes/{name}"],
                                                saved[f"state.{m}_absmax/{name}"], signed,
                                                C.BLOCK)  # fmt: skip
            codes, absmax = Q.quantize_blockwise(values, signed, block)
            assert torch.equal(st[f"{m}_codes"], codes), (name, m)
            assert torch.equal(st[f"{m}_absmax"], absmax), (name, m)
    err = _rel(got[0]["losses"], cont)
    print(f"8-bit block 64 (2 ranks) -> blocks 128/16 (4 ranks): resumed loss max rel {err:.2e}")
    assert err <= 1e-3


def test_states_that_differ_are_refused_naming_them(dist_run, tmp_path):
    sgd = str(tmp_path / "sgd")
    dist_run(2, C.job_save_and_continue, sgd, "sgd", 2, 1, 0, momentum=0.9)
    msg = dist_run(2, C.job_load_error, sgd, "adamw")[0]
    assert ("optimizer rule: checkpoint 'sgd', this run 'adamw': the checkpoint's state(s) "
            "['momentum_buffer'] have no counterpart in rule 'adamw'") in msg
    assert msg.endswith("Nothing was modified.")
    ams = str(tmp_path / "amsgrad")
    dist_run(2, C.job_save_and_continue, ams, "adamw", 2, 1, 0, amsgrad=True)
    msg = dist_run(2, C.job_load_error, ams, "adamw8bit")[0]
    assert ("optimizer state(s) ['max_exp_avg_sq'] of the checkpoint (rule 'adamw') have no "
            "counterpart in this run (rule 'adamw8bit'") in msg
    # the in-memory state_dict holds one rank's shard of one layout: it cannot convert
    msg = dist_run(2, C.job_state_dict_error)[0]
    assert "rule: checkpoint 'adamw', this run 'adamw8bit'" in msg
    assert "save with zeroshard.save_checkpoint and load with zeroshard.load_checkpoint" in msg

"""Bytes a save materialises at stage 3 on 4 ranks (<= one bucket on top of the shard it
already holds), consolidation's peak (<= largest parameter + one saved piece), and a
consolidated GPT-2 that `transformers` loads with the same weights and logits."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

import zeroshard
from tests.ckpt_jobs import build, train
from zeroshard.checkpoint import hf_export as consolidate_mod
from zeroshard.checkpoint import save as save_mod

BUCKET = 700


def job_stage3_save(root: str) -> dict:
    model, opt = build(3, "bf16", bucket=BUCKET)
    train(model, opt, 0, 1)
    zeroshard.save_checkpoint(root, model, opt, tag="t")
    held = opt.memory_report()
    return {"peak": save_mod.LAST_SAVE_STATS["peak_bytes"],
            "shard": held["master"] + held["optimizer_states"] + held["params"],
            "rank": dist.get_rank()}  # fmt: skip


def test_stage3_save_and_consolidate_peaks(dist_run, tmp_path):
    results = dist_run(4, job_stage3_save, str(tmp_path))
    bucket_bytes = BUCKET * 4  # one bucket of fp32
    for r in results:
        print(f"rank {r['rank']}: save materialised {r['peak']} B on top of its shard "
              f"({r['shard']} B); bound: one bucket {bucket_bytes} B")  # fmt: skip
        assert r["peak"] <= bucket_bytes
    out = zeroshard.consolidate(tmp_path, tmp_path / "hf", max_shard_size=20_000)
    peak = consolidate_mod.LAST_CONSOLIDATE_STATS["peak_bytes"]
    largest = max(p.numel() for p in build(0, "bf16")[0].parameters()) * 2
    piece = BUCKET * 4  # a saved fp32 master piece is at most one bucket chunk
    print(f"consolidate peak {peak} B; largest parameter {largest} B + one piece {piece} B")
    assert largest <= peak <= largest + piece
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    from safetensors.torch import load_file

    got = {}
    for f in set(index["weight_map"].values()):
        got.update(load_file(str(out / f)))
    ref_model, _ = build(0, "bf16")
    zeroshard.load_checkpoint(tmp_path, ref_model)  # model-only load, 1 process
    for n, p in ref_model.named_parameters():
        assert got[n].dtype == torch.bfloat16 and torch.equal(got[n], p.detach()), n


def test_consolidated_gpt2_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=101, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    opt = zeroshard.ZeroOptimizer(model.parameters(), "adamw", stage=1, lr=1e-2)
    x = torch.randint(0, 101, (2, 12))
    for _ in range(2):
        opt.backward(model(x, labels=x).loss)
        opt.step()
        opt.zero_grad()
    zeroshard.save_checkpoint(tmp_path / "ck", model, opt)
    zeroshard.consolidate(tmp_path / "ck", tmp_path / "hf")
    cfg.save_pretrained(tmp_path / "hf")
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    model.eval()
    assert torch.equal(model(x).logits, loaded(x).logits)

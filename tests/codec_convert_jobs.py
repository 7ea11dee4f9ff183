"""Jobs of tests/test_checkpoint_codec_convert.py: universal checkpoints of fp32 AdamW states
loaded into AdamW8bit runs and back, per-group block sizes, refused rule changes."""

from __future__ import annotations

import torch

import zeroshard
from tests.adamw8bit_jobs import reference
from tests.ckpt_jobs import train
from tests.models import make_model, param_groups

LR, BETAS, WD = 3e-3, (0.9, 0.95), 0.1
BLOCK, MIN8 = 64, 500  # most test-model matrices 8-bit, several blocks each; norms fp32
BUCKET = 700
GLOBAL_BATCH = 12


def build(rule: str, stage: int, seed: int = 0, block: int = BLOCK, min8: int = MIN8,
          group_codecs: list[dict] | None = None, **hp):  # fmt: skip
    """The test model and a `rule` optimizer (stages 1-2: ZeroOptimizer; 3: initialize).
    `group_codecs`: per param group 8-bit settings (block_size, min_8bit_size)."""
    model = make_model(seed)
    groups = param_groups(model, weight_decay=WD)
    for g, extra in zip(groups, group_codecs or []):
        g.update(extra)
    eight = {"block_size": block, "min_8bit_size": min8} if rule == "adamw8bit" else {}
    if stage == 3:
        cfg = {
            "zero_optimization": {
                "stage": 3, "reduce_bucket_size": BUCKET, "allgather_bucket_size": BUCKET,
                "stage3_prefetch_bucket_size": 2 * BUCKET, "stage3_param_persistence_threshold": 0,
            },
            "optimizer": {"type": "AdamW8bit" if rule == "adamw8bit" else rule, "params": {
                "lr": LR, "betas": list(BETAS), "weight_decay": WD, **eight, **hp}},
        }  # fmt: skip
        return zeroshard.initialize(model, cfg, model_parameters=groups)
    opt = zeroshard.ZeroOptimizer(groups, rule, stage=stage, lr=LR, reduce_bucket_size=BUCKET,
                                  **({"betas": BETAS} if rule != "sgd" else {}), **eight, **hp)
    return model, opt


def job_save_and_continue(root: str, rule: str, stage: int, save_at: int, more: int,
                          **kw) -> list[float]:  # fmt: skip
    """Train `save_at` steps, save, then continue `more` steps in the same codec: the
    reference a resumed run is compared with."""
    model, opt = build(rule, stage, **kw)
    train(model, opt, 0, save_at)
    zeroshard.save_checkpoint(root, model, opt, client_state={"step": save_at})
    return train(model, opt, save_at, more)


def _pieces(opt, model) -> dict[str, list]:
    """This rank's stored state of every piece it holds: name -> [(start, {state: tensor})]."""
    lay = opt.layout(model)
    out: dict[str, list] = {}
    for p, pc in lay.local_pieces():
        st = opt.shard_state(p.shard_group)
        if st.pieces is not None:
            got = {k: t.clone() for k, (t, _) in st.pieces(pc.shard_offset, pc.numel).items()}
        else:
            got = {}
            for k, ts in st.state.items():
                flat = torch.cat([t.reshape(-1) for t in ts])
                got[k] = flat[pc.shard_offset : pc.shard_offset + pc.numel].clone()
        out.setdefault(p.name, []).append((pc.start, got))
    return out


def job_resume(root: str, rule: str, stage: int, more: int, **kw) -> dict:
    """Load into a `rule` optimizer (another init), record the loaded states, train on."""
    model, opt = build(rule, stage, seed=7, **kw)
    _, client = zeroshard.load_checkpoint(root, model, opt)
    loaded = _pieces(opt, model)
    blocks = [g.get("block_size") for g in opt.param_groups]
    return {"loaded": loaded, "blocks": blocks, "memory": opt.memory_report(),
            "losses": train(model, opt, client["step"], more)}


def job_load_error(root: str, rule: str, **hp) -> str:
    """Load a checkpoint into a `rule` stage-2 optimizer; the CheckpointError's text."""
    model, opt = build(rule, 2, seed=7, **hp)
    try:
        zeroshard.load_checkpoint(root, model, opt)
    except zeroshard.CheckpointError as e:
        return str(e)
    return ""


def job_state_dict_error() -> str:
    """The in-memory state_dict of an fp32 AdamW run into an AdamW8bit run: its text."""
    model, opt = build("adamw", 2)
    train(model, opt, 0, 1)
    _, opt8 = build("adamw8bit", 2)
    try:
        opt8.load_state_dict(opt.state_dict())
    except ValueError as e:
        return str(e)
    return ""


def job_train_groups(steps: int, group_codecs: list[dict]) -> dict:
    """AdamW8bit with per-group 8-bit settings at stage 2: losses, parameters, state bytes
    and the absmax length of each 8-bit piece."""
    model, opt = build("adamw8bit", 2, group_codecs=group_codecs)
    losses = train(model, opt, 0, steps)
    per_piece = {}
    for p, pc in opt.layout(model).local_pieces():
        st = opt.shard_state(p.shard_group)
        kinds = st.pieces(pc.shard_offset, pc.numel)
        if "exp_avg_absmax" in kinds:
            per_piece[f"{p.name}@{pc.start}"] = (pc.numel, kinds["exp_avg_absmax"][0].numel())
    names = {n for n, _ in model.named_parameters()}
    return {"losses": losses, "pieces": per_piece, "memory": opt.memory_report(),
            "params": {k: v.clone() for k, v in model.state_dict().items() if k in names}}


def reference_groups(steps: int, group_codecs: list[dict]) -> dict:
    """One process, whole parameters: each 8-bit one stepped by `adamw8bit_step_` with its
    group's block size, the rest by torch.optim.AdamW."""
    return reference(steps, group_codecs=group_codecs)

"""AdamW8bit through the optimizer: jobs run on gloo ranks, and their single-process
reference (each parameter stepped whole by `quant8.adamw8bit_step_`, or torch.optim.AdamW
under the fp32 fallback)."""

from __future__ import annotations

import torch

import zeroshard
from tests.ckpt_jobs import rank_world, train
from tests.models import batch, loss_fn, make_model, param_groups
from zeroshard import quant8 as Q

GLOBAL_BATCH = 12  # divisible by 1, 2, 3 and 4 ranks
LR, BETAS, WD = 3e-3, (0.9, 0.95), 0.1
# The test model's parameters have 24 to 1752 elements: a small threshold and block size make
# most of them 8-bit (several blocks, cut across ranks) and leave norms and biases in fp32.
BLOCK, MIN8 = 64, 500
BUCKET = 700


def config(stage: int, precision: str = "fp32", block: int = BLOCK, min8: int = MIN8,
           bucket: int = BUCKET) -> dict:  # fmt: skip
    cfg = {
        "zero_optimization": {
            "stage": stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
            "stage3_prefetch_bucket_size": 2 * bucket, "stage3_param_persistence_threshold": 0,
        },
        "optimizer": {"type": "AdamW8bit", "params": {
            "lr": LR, "betas": list(BETAS), "weight_decay": WD, "block_size": block,
            "min_8bit_size": min8}},
    }  # fmt: skip
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def build(stage: int, precision: str = "fp32", seed: int = 0, **kw):
    model = make_model(seed)
    return zeroshard.initialize(model, config(stage, precision, **kw),
                                model_parameters=param_groups(model, weight_decay=WD))


def expected_state_bytes(opt) -> int:
    """The formula, piece by piece: 2 bytes per element + 8 per block (8-bit), or 8 per element
    (fallback, decided by the parameter's global size), over what this rank holds."""
    total = 0
    for p, pc in opt.layout().local_pieces():
        if Q.uses_8bit(p.numel, opt.codec.min_8bit_size):
            total += 2 * pc.numel + 8 * Q.num_blocks(pc.numel, opt.codec.block_size)
        else:
            total += 8 * pc.numel
    return total


def job_train(stage: int, precision: str = "fp32", steps: int = 8, **kw) -> dict:
    model, opt = build(stage, precision, **kw)
    losses = train(model, opt, 0, steps)
    lay = opt.layout(model)
    bs = opt.codec.block_size
    aligned = all(
        p.flat_offset % bs == 0 and all(q.start % bs == 0 for q in p.pieces)
        for p in lay.params if Q.uses_8bit(p.numel, opt.codec.min_8bit_size)
    )  # fmt: skip
    names = {n for n, _ in model.named_parameters()}
    if stage == 3:
        from zeroshard import GatheredParameters

        with GatheredParameters(list(model.parameters())):
            params = {k: v.detach().float().clone() for k, v in model.state_dict().items()
                      if k in names}  # fmt: skip
    else:
        params = {k: v.detach().float().clone() for k, v in model.state_dict().items()
                  if k in names}  # fmt: skip
    return {
        "losses": losses, "params": params, "aligned": aligned,
        "memory": opt.memory_report(), "expected": expected_state_bytes(opt),
        "dtypes": sorted({str(t.dtype) for g in opt.shard_groups for t in g.stored_tensors()}),
        "n8": sum(Q.uses_8bit(p.numel, opt.codec.min_8bit_size) for p in lay.params),
    }


def reference(steps: int = 8, block: int = BLOCK, min8: int = MIN8,
              group_codecs: list[dict] | None = None) -> dict:  # fmt: skip
    """One process, whole parameters: 8-bit ones by `adamw8bit_step_`, the rest by AdamW.
    `group_codecs`: per param group {"block_size", "min_8bit_size"} instead of one of each."""
    model = make_model()
    groups = param_groups(model, weight_decay=WD)
    codecs = group_codecs or [{"block_size": block, "min_8bit_size": min8}] * len(groups)
    fallback, states = [], {}
    for g, c in zip(groups, codecs):
        for p in g["params"]:
            if Q.uses_8bit(p.numel(), c["min_8bit_size"]):
                states[p] = (Q.init_state8(p.numel(), c["block_size"]), g, c["block_size"])
            else:
                fallback.append({"params": [p], "lr": g.get("lr", LR),
                                 "weight_decay": g["weight_decay"]})  # fmt: skip
    adamw = torch.optim.AdamW(fallback, lr=LR, betas=BETAS) if fallback else None
    losses = []
    for step in range(steps):
        x, y = batch(step, GLOBAL_BATCH)
        loss = loss_fn(model, x, y)
        loss.backward()
        losses.append(loss.item())
        with torch.no_grad():
            for p, (st, g, size) in states.items():
                Q.adamw8bit_step_(
                    p.data.view(-1), p.grad.reshape(-1), st["exp_avg_codes"],
                    st["exp_avg_absmax"], st["exp_avg_sq_codes"], st["exp_avg_sq_absmax"],
                    lr=g.get("lr", LR), beta1=BETAS[0], beta2=BETAS[1],
                    weight_decay=g["weight_decay"], step=step + 1, block_size=size,
                )  # fmt: skip
        if adamw is not None:
            adamw.step()
        model.zero_grad()
    return {"losses": losses, "n8": len(states),
            "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def job_fallback(steps: int = 3) -> dict:
    """A 6000-element weight (8-bit: its global size reaches 4096 even where a rank holds
    3000) and a 60-element bias (fp32 fallback), default block size and threshold."""
    rank, world = rank_world()
    torch.manual_seed(0)
    model = torch.nn.Linear(100, 60)
    opt = zeroshard.ZeroOptimizer(model.parameters(), "adamw8bit", stage=2, lr=1e-2)
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        x = torch.randn(8, 100, generator=g)
        loss = model(x[rank * 8 // world : (rank + 1) * 8 // world]).pow(2).mean()
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
    st = opt.shard_state(0)
    held = {p.index: pc.numel for p, pc in opt.layout().local_pieces()}
    return {
        "weight": model.weight.detach().clone(), "bias": model.bias.detach().clone(),
        "held": held, "stored": list(st.stored_names), "memory": opt.memory_report(),
        "expected": expected_state_bytes(opt),
        "kinds": {i: sorted(st.pieces(pc.shard_offset, pc.numel))
                  for i, (_, pc) in enumerate(opt.layout().local_pieces())},
    }


def job_save(root: str, stage: int, steps: int) -> list[float]:
    model, opt = build(stage)
    losses = train(model, opt, 0, steps)
    zeroshard.save_checkpoint(root, model, opt, client_state={"step": steps})
    return losses


def job_load_resave(root: str, stage: int, again: str, steps: int) -> dict:
    """Load (from another init), save again at once, then train `steps` more steps."""
    model, opt = build(stage, seed=7, bucket=333)
    _, client = zeroshard.load_checkpoint(root, model, opt)
    zeroshard.save_checkpoint(again, model, opt, client_state=client)
    start = client["step"]
    return {"start": start, "losses": train(model, opt, start, steps)}


def job_load_error(root: str, rule: str) -> str:
    """Load into an optimizer of another state codec; the CheckpointError's text, or ""."""
    model = make_model(7)
    if rule == "adamw8bit":
        _, opt = zeroshard.initialize(model, config(2), model_parameters=param_groups(model))
    else:
        opt = zeroshard.ZeroOptimizer(param_groups(model), "adamw", stage=2, lr=LR)
    try:
        zeroshard.load_checkpoint(root, model, opt)
    except zeroshard.CheckpointError as e:
        return str(e)
    return ""


def job_state_dict(stage: int) -> dict:
    """`state_dict()` after 3 steps, loaded into a fresh optimizer (another init): both then
    train 3 more steps. The stored codes must come back as they were."""
    model, opt = build(stage)
    train(model, opt, 0, 3)
    sd = opt.state_dict()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    model2, opt2 = build(stage, seed=7)
    model2.load_state_dict(weights)
    opt2.load_state_dict(sd)
    same = all(torch.equal(a, b) for g, h in zip(opt.shard_groups, opt2.shard_groups)
               for a, b in zip(g.stored_tensors(), h.stored_tensors()))  # fmt: skip
    return {"same": same, "a": train(model, opt, 3, 3), "b": train(model2, opt2, 3, 3),
            "names": sorted(k for s in sd["state"].values() for k in s)}


def job_backends(kernel: str, steps: int = 2) -> dict:
    """The 8-bit pieces' stored state after `steps` steps with update backend `kernel`."""
    model = make_model()
    opt = zeroshard.ZeroOptimizer(param_groups(model, weight_decay=WD), "adamw8bit", stage=1,
                                  lr=LR, betas=BETAS, block_size=BLOCK, min_8bit_size=MIN8,
                                  kernel=kernel)  # fmt: skip
    train(model, opt, 0, steps)
    out = {}
    for g, st in enumerate(opt.shard_state(i) for i in range(len(opt.shard_groups))):
        for p, pc in opt.layout().local_pieces():
            if p.shard_group == g:
                for k, (t, _) in st.pieces(pc.shard_offset, pc.numel).items():
                    out[f"{k}/{p.index}"] = t.clone()
    return out


def job_init_block_mismatch() -> str:
    """Units partitioned by zeroshard.Init for block 64, an optimizer asking for block 128."""
    with zeroshard.Init(config(3, block=64)):
        model = make_model()
    try:
        zeroshard.initialize(model, config(3, block=128), model_parameters=param_groups(model))
    except ValueError as e:
        return str(e)
    return ""

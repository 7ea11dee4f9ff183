"""ZeRO++ training jobs (run on every rank), with 4 ranks seen as 2 nodes of 2."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from tests.stage3_jobs import train_stage3


@contextlib.contextmanager
def nodes_of(local_world_size: int) -> Iterator[None]:
    """torchrun's LOCAL_WORLD_SIZE for the duration of a job (the pool's ranks are reused)."""
    old = os.environ.get("LOCAL_WORLD_SIZE")
    os.environ["LOCAL_WORLD_SIZE"] = str(local_world_size)
    try:
        yield
    finally:
        if old is None:
            del os.environ["LOCAL_WORLD_SIZE"]
        else:
            os.environ["LOCAL_WORLD_SIZE"] = old


def train_nodes(local_world_size: int, jobs: list[tuple]) -> list[dict]:
    """Several stage-3 runs (train_stage3's arguments, zero keys last) on nodes of
    `local_world_size` ranks."""
    with nodes_of(local_world_size):
        return [train_stage3(*job[:-1], **job[-1]) for job in jobs]


LM = dict(vocab_size=64, n_embd=32, n_layer=2, n_head=2, block_size=16)
LM_GLOBAL = 16  # sequences per micro-step, over all ranks


def lm_config(**zero) -> dict:
    zo = {"stage": 3, "reduce_bucket_size": 20_000, "stage3_prefetch_bucket_size": 20_000,
          "stage3_param_persistence_threshold": 0, **zero}  # fmt: skip
    return {"zero_optimization": zo, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}}}


def build_lm(zero: dict, seed: int = 0, **cfg):
    import torch

    import zeroshard
    from zeroshard.demo.tiny_gpt import GPTConfig, TinyGPT

    torch.manual_seed(seed)
    config = lm_config(**zero)
    config.update(cfg)
    return zeroshard.initialize(TinyGPT(GPTConfig(**LM)), config)


def lm_steps(model, opt, start: int, steps: int, gas: int = 1, seed: int = 0,
             bad_step: int = -1) -> dict:  # fmt: skip
    """Train `steps` steps from step `start`: per-step loss averaged over the world, the norm
    before clipping, and the bytes each step sent. `bad_step`: rank 0's loss is inf there."""
    import torch.distributed as dist

    from zeroshard.demo.tiny_gpt import BigramLanguage

    rank, world = dist.get_rank(), dist.get_world_size()
    lang = BigramLanguage(LM["vocab_size"], seed=seed)
    out: dict = {"losses": [], "norms": [], "comm": []}
    for step in range(start, start + steps):
        total = 0.0
        for k in range(gas):  # one global batch per micro-step, whatever the world size
            x, y = lang.batch(LM_GLOBAL, LM["block_size"], seed=(step * gas + k) * 7919 + seed)
            n = LM_GLOBAL // world
            x, y = x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
            loss = model(x, y)
            if step == bad_step and rank == 0:
                loss = loss * float("inf")
            opt.backward(loss)
            total += loss.item() / gas
        opt.step()
        opt.zero_grad()
        mean = [total]
        gathered = [None] * world
        dist.all_gather_object(gathered, mean)
        out["losses"].append(sum(g[0] for g in gathered) / world)
        out["norms"].append(opt.last_grad_norm)
        out["comm"].append(opt.comm_report())
        if bad_step >= 0:  # a fingerprint of the whole model after each step
            out.setdefault("params", []).append(
                [p.detach().double().sum().item() for p in model.state_dict().values()])
    out["skipped"] = opt.skipped_steps
    return out


def train_lm(zero: dict, steps: int, seed: int = 0, gas: int = 1, bad_step: int = -1,
             **cfg) -> dict:  # fmt: skip
    """The demo's GPT, small, on its synthetic bigram language."""
    model, opt = build_lm(zero, seed, gradient_accumulation_steps=gas, **cfg)
    return lm_steps(model, opt, 0, steps, gas, seed, bad_step)


def lm_runs(local_world_size: int, variants: list[dict], steps: int, **kw) -> list[dict]:
    with nodes_of(local_world_size):
        return [train_lm(zero, steps, **kw) for zero in variants]


ALL3 = {"zero_quantized_weights": True, "zero_quantized_gradients": True,
        "zero_hpz_partition_size": 2}  # fmt: skip


def hierarchical_job(seed: int) -> dict:
    """qgZ's reduce-scatter against the exact mean, on 2 nodes of 2."""
    import torch
    import torch.distributed as dist

    from zeroshard.comm.collectives import Comm
    from zeroshard.config.zeropp import ZeroPPConfig
    from zeroshard.stage3.zeropp import build_zeropp

    rank, world = dist.get_rank(), dist.get_world_size()
    with nodes_of(2):
        world_comm = Comm()
        hq = build_zeropp(world_comm, ZeroPPConfig(quantized_gradients=True)).grads
    chunk = 1000
    inputs = [torch.randn(world * chunk, generator=torch.Generator().manual_seed(seed + r))
              * (1 + r) for r in range(world)]  # fmt: skip
    exact = torch.stack(inputs).mean(0).view(world, chunk)[rank]
    out = torch.empty(chunk)
    mine = inputs[rank].clone()
    hq.reduce_scatter(out, mine, op="avg")
    again = inputs[rank].clone()  # in place: the output is the input's own chunk
    hq.reduce_scatter(again.view(world, chunk)[rank], again, op="avg", async_op=True).wait()
    report = world_comm.counter.snapshot()
    # a second reduction launched after the first one's intra-node hop landed posts the
    # first one's inter-node hop at once (it overlaps what follows, not only wait())
    first = hq.reduce_scatter(torch.empty(chunk), inputs[rank].clone(), async_op=True)
    first.work.wait()
    second = hq.reduce_scatter(torch.empty(chunk), inputs[rank].clone(), async_op=True)
    posted_early = first.rows is not None
    second.wait()
    first.wait()  # waited out of order: still the same result
    same = torch.equal(first.output, out) and torch.equal(second.output, out)
    world_comm.counter.snapshot()
    poisoned = inputs[rank].clone()
    if rank == 1:
        poisoned[3 * chunk + 5] = float("nan")  # reaches rank 3's chunk only
    bad = torch.empty(chunk)
    hq.reduce_scatter(bad, poisoned, op="avg")
    return {"out": out, "exact": exact, "in_place": again.view(world, chunk)[rank].clone(),
            "report": report, "finite": bool(torch.isfinite(bad).all()),
            "posted_early": posted_early, "same": same}


def bytes_job() -> dict:
    """All three parts with one bucket per unit and no prefetch: every collective's size is
    known from the units."""
    with nodes_of(2):
        model, opt = build_lm({**ALL3, "reduce_bucket_size": 10**7,
                               "stage3_prefetch_bucket_size": 1})  # fmt: skip
        out = lm_steps(model, opt, 0, 2)
    units = opt.sharding.engine.units
    out["units"] = [(u.shard_numel, len(u.buckets), u.persistent) for u in units]
    return out


def secondary_memory_job(max_reuse: int = 0) -> dict:
    """hpZ's secondary shards: made for each unit forward released (1/P of it), none for the
    units kept gathered into backward; held until the update, counted in memory_report."""
    import torch.distributed as dist

    from zeroshard.demo.tiny_gpt import BigramLanguage
    from zeroshard.stage3.unit import RELEASED

    with nodes_of(2):
        model, opt = build_lm({"zero_hpz_partition_size": 2,
                               "stage3_max_reuse_distance": max_reuse})  # fmt: skip
        lang = BigramLanguage(LM["vocab_size"])
        x, y = lang.batch(LM_GLOBAL // 4, LM["block_size"], seed=dist.get_rank())
        loss = model(x, y)  # the first step records the order: the second one is steady
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
        units = [u for u in opt.sharding.engine.units if not u.persistent]
        gathered: set[int] = set()  # units seen gathered around some module's forward ...
        released: set[int] = set()  # ... and released later in the forward

        def seen(*_: object) -> None:
            for i, u in enumerate(units):
                if u.state is not RELEASED:
                    gathered.add(i)
                elif i in gathered:
                    released.add(i)

        hooks = [m.register_forward_pre_hook(seen) for m in model.modules()]
        hooks += [m.register_forward_hook(seen) for m in model.modules()]
        loss = model(x, y)
        for h in hooks:
            h.remove()
        opt.backward(loss)
        during = opt.memory_report()
        opt.step()
        after = opt.memory_report()
    expected = sum(units[i].numel // 2 * units[i].full_bytes // units[i].numel for i in released)
    return {"during": during, "after": after, "expected": expected,
            "released": len(released), "units": len(units)}


def exact_state_dict_job() -> bool:
    """After qwZ training, `state_dict()` holds the exact shards, not their quantized copy."""
    import torch

    with nodes_of(2):
        model, opt = build_lm({"zero_quantized_weights": True})
        lm_steps(model, opt, 0, 2)
        sd = model.state_dict()
    names = {id(p): n for n, p in model.named_parameters()}
    for u in opt.sharding.engine.units:
        if u.persistent:
            continue
        flat = torch.zeros(u.numel)
        for s in u.slots:
            flat[s.offset : s.offset + s.numel] = sd[names[id(s.param)]].reshape(-1)
        for b, piece in zip(u.buckets, u.shard_pieces):
            if not torch.equal(flat[slice(*b.chunk_range(u.rank))], piece):
                return False
    return True


def save_job(root: str, zero: dict, steps: int) -> list[float]:
    import zeroshard

    with nodes_of(2):
        model, opt = build_lm(zero)
        out = lm_steps(model, opt, 0, steps)
        zeroshard.save_checkpoint(root, model, opt)
    return out["losses"]


def resume_job(root: str, again: str, zero: dict, steps: int) -> list[float]:
    """Load `root` (any world size, with or without ZeRO++), re-save it at once into
    `again`, train on."""
    import zeroshard

    with nodes_of(2):
        model, opt = build_lm(zero, seed=123)  # other initial weights: the load must win
        _, client = zeroshard.load_checkpoint(root, model, opt)
        zeroshard.save_checkpoint(again, model, opt)
        return lm_steps(model, opt, 2, steps)["losses"]


def bad_topology_job(local_world_size: int, zero: dict) -> str:
    """The error every rank raises (or "" if none)."""
    with nodes_of(local_world_size):
        try:
            build_lm(zero)
        except ValueError as e:
            return str(e)
    return ""

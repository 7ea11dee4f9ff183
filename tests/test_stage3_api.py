"""Stage 3 user-facing behaviour on 2 gloo ranks: eval/no-grad and generate-style loops leak
no gathered parameters; GatheredParameters writes changes back (fp32 shard and bf16 master);
`model.state_dict()` gives full tensors (rank 0 only as an option) and loads back;
`zeroshard.initialize` with configs/zero3*.json; bad input names the problem and the rank;
an exception inside forward on one rank ends every rank with an error, no hang."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from tests.models import SEQ, loss_fn, make_model, param_groups
from tests.stage3_jobs import local_batch, stage3_config

ROOT = Path(__file__).resolve().parents[1]


def _setup(precision: str = "fp32"):
    from zeroshard import initialize

    model = make_model()
    cfg = stage3_config("adamw", precision)
    return initialize(model, cfg, model_parameters=param_groups(model))


def loops_job() -> dict:
    """Train a step, then eval + no_grad forwards and a greedy generate loop."""
    model, opt = _setup()
    engine = opt.sharding.engine
    x, y = local_batch(0)
    opt.backward(loss_fn(model, x, y))
    opt.step()
    opt.zero_grad()
    full = {k: v.clone() for k, v in model.state_dict().items()}
    reference = make_model()
    reference.load_state_dict(full)
    model.eval()
    reference.eval()
    out: dict = {}
    with torch.no_grad():
        logits = model(x)
        out["eval_error"] = (logits - reference(x)).abs().max().item()
        tokens = x[:, :2]
        ref_tokens = tokens.clone()
        while tokens.shape[1] < SEQ:  # generate-style: grow the sequence one token a time
            nxt = model(tokens)[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
            ref_nxt = reference(ref_tokens)[:, -1].argmax(-1, keepdim=True)
            ref_tokens = torch.cat([ref_tokens, ref_nxt], dim=1)
        out["generated_same"] = torch.equal(tokens, ref_tokens)
    out["gathered_after_loops"] = engine.tracker.current
    out["gathered_units"] = len(engine.gathered_units())
    blk = model.blocks[0]
    out["placeholder_bytes"] = max(p.untyped_storage().nbytes() for p in blk.parameters())
    model.train()
    opt.backward(loss_fn(model, x, y))  # and training still works afterwards
    opt.step()
    out["gathered_after_train"] = engine.tracker.current
    return out


def test_eval_and_generate_loops_do_not_leak(dist_run):
    for r in dist_run(2, loops_job):
        assert r["eval_error"] < 1e-5
        assert r["generated_same"]
        assert r["gathered_after_loops"] == 0 and r["gathered_units"] == 0
        assert r["placeholder_bytes"] <= 4  # released parameters hold one element, no data
        assert r["gathered_after_train"] == 0


def gathered_job(precision: str) -> dict:
    import zeroshard

    model, opt = _setup(precision)
    rank = torch.distributed.get_rank()
    w = model.blocks[0].mlp[0].weight
    with zeroshard.GatheredParameters(w, modifier_rank=0):
        full_shape = tuple(w.shape)
        with torch.no_grad():
            w.fill_(0.5 if rank == 0 else -7.0)  # rank 0's change wins
    with zeroshard.GatheredParameters([w]):  # read-only: changes are discarded
        with torch.no_grad():
            w.fill_(3.0)
    after = model.state_dict()["blocks.0.mlp.0.weight"].float()
    # a step with lr 0 writes the master back into the parameters: it must hold 0.5 too
    for g in opt.param_groups:
        g["lr"] = 0.0
    x, y = local_batch(0)
    opt.backward(loss_fn(model, x, y))
    opt.step()
    stepped = model.state_dict()["blocks.0.mlp.0.weight"].float()
    return {
        "shape": full_shape, "after": after, "stepped": stepped,
        "leaked": opt.sharding.engine.tracker.current, "numel_outside": w.numel(),
    }  # fmt: skip


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gathered_parameters_write_back(dist_run, precision):
    for r in dist_run(2, gathered_job, precision):
        assert r["shape"] == (73, 24)
        assert torch.all(r["after"] == 0.5)
        assert torch.all(r["stepped"] == 0.5)
        assert r["leaked"] == 0 and r["numel_outside"] == 73 * 24  # placeholder: full shape


def state_dict_job() -> dict:
    from zeroshard.stage3 import full_state_dict

    model, opt = _setup()
    rank = torch.distributed.get_rank()
    full = model.state_dict()
    rank0 = full_state_dict(model, rank0_only=True)
    other = make_model(seed=5).state_dict()
    model.load_state_dict(other)
    reloaded = model.state_dict()
    x, y = local_batch(0)
    model2 = make_model(seed=5)
    return {
        "rank": rank,
        "matches_init": all(torch.equal(full[k], v) for k, v in make_model().state_dict().items()),
        "rank0_keys": len(rank0),
        "reloaded": all(torch.equal(reloaded[k], v) for k, v in other.items()),
        "forward_after_load": (model(x) - model2(x)).abs().max().item(),
        "leaked": opt.sharding.engine.tracker.current,
    }


def test_state_dict_full_tensors(dist_run):
    n_keys = len(make_model().state_dict())
    for r in dist_run(2, state_dict_job):
        assert r["matches_init"] and r["reloaded"]
        assert r["rank0_keys"] == (n_keys if r["rank"] == 0 else 0)
        assert r["forward_after_load"] < 1e-6
        assert r["leaked"] == 0


def initialize_job(config_name: str) -> dict:
    import zeroshard

    model = make_model()
    model, opt = zeroshard.initialize(model, str(ROOT / "configs" / config_name))
    losses = []
    for step in range(3):
        x, y = local_batch(step)
        loss = loss_fn(model, x, y)
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {
        "losses": losses, "lr": opt.param_groups[0]["lr"], "memory": opt.memory_report(),
        "dtype": str(next(iter(model.state_dict().values())).dtype),
    }  # fmt: skip


@pytest.mark.parametrize("config_name", ["zero3.json", "zero3_bf16.json"])
def test_initialize_with_shipped_configs(dist_run, config_name):
    for r in dist_run(2, initialize_job, config_name):
        assert all(torch.isfinite(torch.tensor(r["losses"])))
        assert r["lr"] > 0  # the WarmupLR scheduler stepped
        assert r["memory"]["comm_buffers"] == 0


def test_bad_input_names_problem_and_rank():
    from zeroshard import initialize

    model = make_model()
    stranger = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"rank 0: param group 0 has a parameter of shape"):
        initialize(model, stage3_config(), model_parameters=[stranger])


def checkpoint_job() -> dict:
    """4 steps straight vs 2 steps, save (optimizer shards + full model), rebuild, load, 2."""

    def run(model, opt, steps) -> None:
        for step in steps:
            x, y = local_batch(step)
            opt.backward(loss_fn(model, x, y))
            opt.step()
            opt.zero_grad()

    model, opt = _setup("bf16")
    run(model, opt, range(4))
    straight = model.state_dict()
    model, opt = _setup("bf16")
    run(model, opt, range(2))
    saved_model, saved_opt = model.state_dict(), opt.state_dict()
    model, opt = _setup("bf16")
    model.load_state_dict(saved_model)
    opt.load_state_dict(saved_opt)
    run(model, opt, range(2, 4))
    resumed = model.state_dict()
    return {"same": all(torch.equal(straight[k], resumed[k]) for k in straight)}


def test_checkpoint_round_trip_same_world(dist_run):
    assert all(r["same"] for r in dist_run(2, checkpoint_job))


def fp16_job() -> dict:
    """fp16 with loss scaling; rank 1's loss is inf at step 2: every rank skips that step."""
    from zeroshard import initialize

    cfg = stage3_config()
    cfg["fp16"] = {"enabled": True, "initial_scale_power": 8, "hysteresis": 1}
    model = make_model()
    model, opt = initialize(model, cfg, model_parameters=param_groups(model))
    rank = torch.distributed.get_rank()
    scales, before, after = [], None, None
    for step in range(4):
        x, y = local_batch(step)
        loss = loss_fn(model, x, y)
        if step == 2:
            before = model.state_dict()
            if rank == 1:
                loss = loss * float("inf")
        opt.backward(loss)
        opt.step()
        opt.zero_grad()
        if step == 2:
            after = model.state_dict()
        scales.append(opt.loss_scale)
    return {
        "scales": scales, "skipped": opt.skipped_steps,
        "unchanged": all(torch.equal(before[k], after[k]) for k in before),
        "dtype": str(before["embed.weight"].dtype), "leaked": opt.sharding.engine.tracker.current,
    }  # fmt: skip


def test_fp16_overflow_skips_on_every_rank(dist_run):
    for r in dist_run(2, fp16_job):
        assert r["dtype"] == "torch.float16"
        assert r["skipped"] == 1 and r["unchanged"]
        assert r["scales"] == [256.0, 256.0, 128.0, 128.0]
        assert r["leaked"] == 0


# -- an exception inside forward on one rank --------------------------------------------------

TIMEOUT_S = 3


class _Boom(torch.nn.Module):
    def __init__(self, on_call: int) -> None:
        super().__init__()
        self.calls, self.on_call = 0, on_call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if torch.distributed.get_rank() == 1 and self.calls == self.on_call:
            raise RuntimeError("boom on rank 1")
        return x


def _failing_rank(rank: int, port: int, results, stage: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", rank=rank, world_size=2, timeout=timedelta(seconds=TIMEOUT_S)
    )
    from zeroshard import initialize

    # rank 1 raises in the middle of a forward: stage 2's second, once its gradient buckets
    # are reduced during backward (point-to-point on gloo: rank 0 waits on a receive)
    on_call = 1 if stage == 3 else 2
    model = make_model()
    model.blocks[0].mlp.insert(1, _Boom(on_call))
    cfg = stage3_config()
    if stage != 3:
        cfg["zero_optimization"] = {"stage": stage, "reduce_bucket_size": 700}
    model, opt = initialize(model, cfg)
    try:
        for i in range(on_call):
            start = time.monotonic()  # the failing step's own time
            x, y = local_batch(i)
            opt.backward(loss_fn(model, x, y))
            opt.step()
        results.put((rank, "finished", time.monotonic() - start))
    except Exception as e:  # the point: every rank gets here
        results.put((rank, f"{type(e).__name__}: {e}", time.monotonic() - start))
        if rank == 1:  # stay alive (a process that caught the error): rank 0 must time out
            time.sleep(TIMEOUT_S + 4)
    results.close()
    results.join_thread()  # flush the report before the hard exit below
    os._exit(0)  # skip destroy_process_group: the peer may be gone


@pytest.mark.parametrize("stage", [2, 3])
def test_exception_on_one_rank_ends_every_rank(stage):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_failing_rank, args=(r, port, results, stage))
             for r in range(2)]  # fmt: skip
    for p in procs:
        p.start()
    try:
        got = dict((r, (msg, t)) for r, msg, t in (results.get(timeout=60) for _ in range(2)))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert "boom on rank 1" in got[1][0]
    assert got[0][0] != "finished", "rank 0 went on as if nothing happened"
    assert got[0][1] < TIMEOUT_S + 10, f"rank 0 took {got[0][1]:.1f} s to fail"
    print(f"rank 0 ended with {got[0][0][:120]!r} after {got[0][1]:.1f} s")

"""Train the same GPT the same way under DDP, torch ZeRO, FSDP2, DeepSpeed ZeRO and zeroshard.

Users coming from DeepSpeed or FSDP compare on their own model and machine, so this runs every
system on one model (the demo TinyGPT, ~4.24M params), one data stream, one AdamW, one process
group, and reports per system: ms/step (median, p10-p90 over timed steps after warmup, split
into forward+backward and optimizer step), rank-0 bytes held by category (counted from the
tensors each system actually holds, after the last backward and before its step), the loss
trajectory (fp32 systems must agree) and ms/step ratios to DDP and to zeroshard at the same
stage. Systems run one after another, in `--rounds` interleaved rounds so machine drift hits
all alike.

    python bench/bench_train.py                       # everything, 2 ranks, ~5 min on 2 cores
    python bench/bench_train.py --quick --systems ddp,zs-2

Spawns its own 2 gloo ranks (1 thread each; `--ranks`, and `--local-world-size` to see them as
nodes, as bench_zeropp.py does). DeepSpeed rows are skipped when it is not installed; zeroshard
stage 3 rows when `zeroshard.stage3` is not importable yet. The default run leaves out the
ZeRO++ rows (bench_zeropp.py runs them).
Writes <out>/bench_train.json and <out>/bench_train.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import socket
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch starts OpenMP
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import Tensor, nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zeroshard.demo.tiny_gpt import BigramLanguage, GPTConfig, TinyGPT  # noqa: E402

MiB = 2**20
CATEGORIES = ("params", "grads", "optimizer_states", "master", "other")
LR, WD, BETAS, EPS = 1e-3, 0.01, (0.9, 0.999), 1e-8

# name -> (family, stage, precision). Order is the run order within a round.
SYSTEMS: dict[str, tuple[str, int, str]] = {
    "ddp": ("ddp", 0, "fp32"),
    "ddp-foreach": ("ddp", 0, "fp32"),
    "torch-zero": ("torch-zero", 1, "fp32"),
    "fsdp2": ("fsdp2", 3, "fp32"),
    "ds-zero1": ("deepspeed", 1, "fp32"),
    "ds-zero2": ("deepspeed", 2, "fp32"),
    "ds-zero3": ("deepspeed", 3, "fp32"),
    "zs-0": ("zeroshard", 0, "fp32"),
    "zs-1": ("zeroshard", 1, "fp32"),
    "zs-2": ("zeroshard", 2, "fp32"),
    "zs-3": ("zeroshard", 3, "fp32"),
    # stages 1-2 with `overlap_param_gather`: the post-step all-gather behind the next forward
    "zs-1-opg": ("zeroshard", 1, "fp32"),
    "zs-2-opg": ("zeroshard", 2, "fp32"),
    "ds-zero2-bf16": ("deepspeed", 2, "bf16"),
    "ds-zero3-bf16": ("deepspeed", 3, "bf16"),
    "zs-2-bf16": ("zeroshard", 2, "bf16"),
    "zs-3-bf16": ("zeroshard", 3, "bf16"),
}
# ZeRO++ at stage 3 (bench_zeropp.py: 4 ranks as 2 nodes x 2), with DeepSpeed's keys. "fp32-q":
# fp32 training whose wire is quantized (its losses are not held to the fp32 agreement).
ZEROPP_KEYS: dict[str, dict[str, Any]] = {
    "qwz": {"zero_quantized_weights": True},
    "qgz": {"zero_quantized_gradients": True},
    "hpz": {"zero_hpz_partition_size": 2},
    "zeropp": {"zero_quantized_weights": True, "zero_quantized_gradients": True,
               "zero_hpz_partition_size": 2},
}  # fmt: skip
for _part, _keys in ZEROPP_KEYS.items():
    _prec = "fp32" if "zero_hpz_partition_size" in _keys and len(_keys) == 1 else "fp32-q"
    SYSTEMS[f"zs-3-{_part}"] = ("zeroshard", 3, _prec)
    SYSTEMS[f"ds-3-{_part}"] = ("deepspeed", 3, _prec)
# bench_train's default run: the single-node systems
DEFAULT_SYSTEMS = [s for s in SYSTEMS if s.rsplit("-", 1)[-1] not in ZEROPP_KEYS]


def zeropp_keys(name: str) -> dict[str, Any]:
    """The ZeRO++ keys of system `name` ({} for the others)."""
    return dict(ZEROPP_KEYS.get(name.partition("-3-")[2], {}))


def zeroshard_peer(name: str) -> str:
    """The zeroshard row at the same ZeRO stage and precision (what users compare against)."""
    _, stage, prec = SYSTEMS[name]
    return f"zs-{stage}" + ("-bf16" if prec == "bf16" else "")


# -- byte accounting -------------------------------------------------------------------------
def _tensors(obj: Any, depth: int = 3) -> Iterable[Tensor]:
    """Every tensor reachable from `obj` through lists, tuples, dicts (a few levels)."""
    if isinstance(obj, Tensor):
        yield _local(obj)
    elif depth > 0 and isinstance(obj, (list, tuple, set)):
        for x in obj:
            yield from _tensors(x, depth - 1)
    elif depth > 0 and isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x, depth - 1)


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (FSDP2), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def count_bytes(held: dict[str, Iterable[Tensor]]) -> dict[str, int]:
    """Bytes per category, each storage counted once (first category in CATEGORIES wins), so a
    view (a grad that is a DDP bucket view, an fp32 master that is the param) adds nothing."""
    seen: set[int] = set()
    out: dict[str, int] = {}
    for cat in CATEGORIES:
        total = 0
        for t in held.get(cat, ()):
            if t is None or t.numel() == 0:
                continue
            s = t.untyped_storage()
            if s.data_ptr() in seen:
                continue
            seen.add(s.data_ptr())
            total += s.nbytes()
        out[cat] = total
    out["total"] = sum(out[c] for c in CATEGORIES)
    return out


def _as_bytes(held: dict[str, Any]) -> dict[str, int]:
    """Byte counts as they are (zeroshard's own report), or counted from tensors."""
    if all(isinstance(v, int) for v in held.values()):
        out = {c: int(held.get(c, 0)) for c in CATEGORIES}
        out["total"] = sum(out.values())
        return out
    return count_bytes(held)


def _torch_opt_state(opt: torch.optim.Optimizer) -> list[Tensor]:
    return list(_tensors(list(opt.state.values())))


# -- the systems -------------------------------------------------------------------------------
@dataclass
class Runner:
    """One system set up on this rank: how it trains one step and what it holds."""

    forward_backward: Callable[[Tensor, Tensor], Tensor]
    step: Callable[[], None]
    held: Callable[[], dict[str, Any]]  # tensors per category, or bytes per category
    info: dict[str, Any] = field(default_factory=dict)


def _model(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(args.seed)
    cfg = GPTConfig(vocab_size=args.vocab, n_embd=args.dim, n_layer=args.layers,
                    n_head=args.heads, block_size=args.seq)  # fmt: skip
    return TinyGPT(cfg)


def _adamw(params: Iterable[Tensor], fused: bool) -> torch.optim.AdamW:
    kw: dict[str, Any] = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **kw)


def build_ddp(args: argparse.Namespace, fused: bool) -> Runner:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _model(args)
    ddp = DDP(model, gradient_as_bucket_view=True)  # grads are views of DDP's buckets
    opt = _adamw(model.parameters(), fused)

    def fb(x: Tensor, y: Tensor) -> Tensor:
        loss = ddp(x, y)
        loss.backward()
        return loss

    def step() -> None:
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the bucket views (DDP's default path)

    def held() -> dict[str, Iterable[Tensor]]:
        ps = list(model.parameters())
        return {"params": ps, "grads": [p.grad for p in ps], "optimizer_states":
                _torch_opt_state(opt)}  # fmt: skip

    return Runner(fb, step, held, {"optimizer": "AdamW fused" if fused else "AdamW foreach"})


def build_torch_zero(args: argparse.Namespace) -> Runner:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _model(args)
    ddp = DDP(model, gradient_as_bucket_view=True)
    opt = ZeroRedundancyOptimizer(
        model.parameters(), optimizer_class=torch.optim.AdamW, lr=LR, betas=BETAS, eps=EPS,
        weight_decay=WD, fused=True,
    )  # fmt: skip

    def fb(x: Tensor, y: Tensor) -> Tensor:
        loss = ddp(x, y)
        loss.backward()
        return loss

    def step() -> None:
        opt.step()
        opt.zero_grad(set_to_none=False)

    def held() -> dict[str, Iterable[Tensor]]:
        ps = list(model.parameters())
        return {"params": ps, "grads": [p.grad for p in ps],
                "optimizer_states": _torch_opt_state(opt.optim)}  # fmt: skip

    return Runner(fb, step, held, {"optimizer": "AdamW fused (this rank's params)"})


def build_fsdp2(args: argparse.Namespace) -> Runner:
    from torch.distributed.fsdp import fully_shard

    model = _model(args)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    try:
        opt = _adamw(model.parameters(), fused=True)
        kind = "AdamW fused on DTensor shards"
    except Exception:  # noqa: BLE001 - fused not available for DTensor: say so
        opt = _adamw(model.parameters(), fused=False)
        kind = "AdamW foreach on DTensor shards"

    def fb(x: Tensor, y: Tensor) -> Tensor:
        loss = model(x, y)
        loss.backward()
        return loss

    def step() -> None:
        opt.step()
        opt.zero_grad()

    def held() -> dict[str, Iterable[Tensor]]:
        ps = list(model.parameters())
        return {"params": [_local(p) for p in ps],
                "grads": [_local(p.grad) for p in ps if p.grad is not None],
                "optimizer_states": _torch_opt_state(opt)}  # fmt: skip

    return Runner(fb, step, held, {"optimizer": kind})


def _zero_section(stage: int, bucket: int, reuse: int = 100_000_000) -> dict[str, Any]:
    """The same ZeRO knobs for DeepSpeed and zeroshard (zeroshard reads DeepSpeed's keys).
    `reuse`: stage3_max_reuse_distance (0: every unit is released after each use and
    gathered again in backward, as on a model too large to keep gathered)."""
    zo: dict[str, Any] = {
        "stage": stage, "overlap_comm": True, "contiguous_gradients": True,
        "reduce_bucket_size": bucket, "allgather_bucket_size": bucket,
    }  # fmt: skip
    if stage == 3:  # DeepSpeed's ZeRO-3 defaults allocate a 2 GB buffer on CPU
        zo.update(
            stage3_prefetch_bucket_size=bucket // 2,
            stage3_param_persistence_threshold=10000,
            stage3_max_live_parameters=100_000_000,
            stage3_max_reuse_distance=reuse,
        )
    return zo


def _ds_config(args: argparse.Namespace, stage: int, bf16: bool,
               zeropp: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": list(BETAS), "eps": EPS,
                                                  "weight_decay": WD, "torch_adam": True}},
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_optimization": _zero_section(stage, args.bucket, args.max_reuse_distance),
    }  # fmt: skip
    cfg["zero_optimization"].update(zeropp or {})
    if bf16:
        cfg["bf16"] = {"enabled": True}
    return cfg


def build_deepspeed(args: argparse.Namespace, stage: int, bf16: bool,
                    zeropp: dict[str, Any] | None = None) -> Runner:  # fmt: skip
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    deepspeed.utils.logger.setLevel(logging.ERROR)
    model = _model(args)
    if stage == 3 and not (zeropp or {}).get("zero_hpz_partition_size"):
        # DeepSpeed keeps hpZ's process group process-wide and hands it to every later ZeRO-3
        # engine, whatever that one's config says (0.19.8: zero/stage3.py reads it unconditionally):
        # without this, plain ZeRO-3 after an hpZ row silently runs hpZ. Its getter is private.
        from deepspeed.utils import groups

        hpz_group = groups._get_zero_param_intra_parallel_group()
        if hpz_group is not None:
            deepspeed.comm.destroy_process_group(hpz_group)
    # torch.distributed is already up: deepspeed.init_distributed wraps the existing process
    # group (comm.TorchBackend) instead of creating another one.
    engine, opt, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(),
        config=_ds_config(args, stage, bf16, zeropp),
    )
    inner = opt.optimizer  # the torch AdamW on the fp32 partitions
    info: dict[str, Any] = {}

    def fb(x: Tensor, y: Tensor) -> Tensor:
        loss = engine(x, y)
        engine.backward(loss)
        return loss

    def held() -> dict[str, Iterable[Tensor]]:
        h: dict[str, list[Tensor]] = {c: [] for c in CATEGORIES}
        states = _torch_opt_state(inner)
        if stage == 3:
            h["params"] = list(_tensors(opt.fp16_partitioned_groups_flat))
            h["params"] += [p.ds_tensor for p in model.parameters()]
            h["params"] += [p.data for p in model.parameters()]  # persistent (never sharded)
            # hpZ: the secondary (node-local) shards DeepSpeed keeps from forward to the update
            secondary = [p.ds_secondary_tensor for p in model.parameters()
                         if getattr(p, "ds_secondary_tensor", None) is not None]  # fmt: skip
            h["params"] += secondary
            info["hpz_secondary_bytes"] = sum(t.numel() * t.element_size() for t in secondary)
            h["grads"] = list(_tensors(getattr(opt, "grad_partitions_flat_buffer", None)))
            h["grads"] += list(_tensors(getattr(opt, "averaged_gradients", {})))
            h["master"] = list(_tensors(opt.fp32_partitioned_groups_flat))
        else:
            h["params"] = list(_tensors(opt.bit16_groups_flat)) + list(model.parameters())
            h["grads"] = list(_tensors(getattr(opt, "averaged_gradients", {})))
            h["grads"] += list(_tensors(getattr(opt, "grads_in_partition", None)))
            h["grads"] += [p.grad for p in model.parameters() if p.grad is not None]
            h["master"] = list(_tensors(opt.single_partition_of_fp32_groups))
        h["optimizer_states"] = states
        # anything else the ZeRO optimizer keeps (reduction buckets, ...)
        h["other"] = [t for v in vars(opt).values() for t in _tensors(v, 2)]
        return h

    info.update(
        optimizer="torch AdamW (torch_adam) on fp32 partitions",
        communication_data_type=str(getattr(engine, "communication_data_type", "?")),
    )
    return Runner(fb, engine.step, held, info)


def build_zeroshard(args: argparse.Namespace, stage: int, bf16: bool,
                    overlap_param_gather: bool = False,
                    zeropp: dict[str, Any] | None = None) -> Runner:  # fmt: skip
    import zeroshard

    model = _model(args)
    if stage < 3 and not bf16:
        # the drop-in way: what a DDP + AdamW user writes
        opt = zeroshard.ZeroOptimizer(
            model.parameters(), "adamw", stage=stage, lr=LR, betas=BETAS, eps=EPS,
            weight_decay=WD, reduce_bucket_size=args.bucket, allgather_bucket_size=args.bucket,
            overlap_comm=True, overlap_param_gather=overlap_param_gather, model=model,
        )  # fmt: skip
        how = "ZeroOptimizer (drop-in)"
    else:
        cfg = _ds_config(args, stage, bf16, zeropp)
        cfg["optimizer"]["params"].pop("torch_adam")
        model, opt = zeroshard.initialize(model, cfg)
        how = "zeroshard.initialize"

    def fb(x: Tensor, y: Tensor) -> Tensor:
        loss = model(x, y)
        opt.backward(loss)
        return loss

    def step() -> None:
        opt.step()
        opt.zero_grad()

    info: dict[str, Any] = {}

    def held() -> dict[str, int]:
        # zeroshard counts its own tensors the same way (per storage, views free)
        rep = opt.memory_report()
        if "hpz_secondary" in rep:  # hpZ's secondary shards, part of `params`
            info["hpz_secondary_bytes"] = rep["hpz_secondary"]
        return {
            "params": rep["params"],
            "grads": rep["grads"],
            "master": rep["master"],
            "optimizer_states": rep["optimizer_states"],
            "other": rep["comm_buffers"],
        }

    info["optimizer"] = f"{how}, kernel {getattr(opt, 'kernel', '?')}"
    runner = Runner(fb, step, held, info)
    runner.info["comm"] = opt.comm_report
    return runner


class SkipSystem(Exception):
    """A system that cannot run here (not installed, not built yet): reported, not fatal."""


def build(name: str, args: argparse.Namespace) -> Runner:
    family, stage, prec = SYSTEMS[name]
    bf16 = prec == "bf16"
    if family == "ddp":
        return build_ddp(args, fused=name == "ddp")
    if family == "torch-zero":
        return build_torch_zero(args)
    if family == "fsdp2":
        return build_fsdp2(args)
    if family == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise SkipSystem(
                "deepspeed is not installed (DS_BUILD_OPS=0 pip install deepspeed==0.19.8)"
            ) from None
        return build_deepspeed(args, stage, bf16, zeropp_keys(name))
    return build_zeroshard(args, stage, bf16, overlap_param_gather=name.endswith("-opg"),
                           zeropp=zeropp_keys(name))  # fmt: skip


# -- counting collectives -----------------------------------------------------------------------
class CollectiveCount:
    """Collectives this rank issues, counted at the dispatcher (every c10d op goes through
    it, whichever system issues it), so DDP, FSDP2, DeepSpeed and zeroshard are counted the
    same way. Used for one extra, untimed step: a dispatch mode slows every op.

    `sent` has the bytes each kind of op sends from this rank by the ring formulas zeroshard's
    own counters use (comm/collectives.py: all-gather and reduce-scatter S·(N-1)/N, all-reduce
    twice that, broadcast S·(N-1)/N, all-to-all its input·(N-1)/N, a send its tensor), and
    `inter_node` the part of it addressed to ranks on other nodes (nodes of LOCAL_WORLD_SIZE
    consecutive ranks, as zeroshard's topology). What an op sends is read from its own
    tensors, so the same step of two systems is compared, not their documentation. gloo runs
    some ops in other forms (zeroshard's stage-3 reduce-scatter is an in-place all-reduce on
    gloo, counted here as an all-reduce): these are the bytes of the c10d calls made."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counts: dict[str, int] = {}
        sent: dict[str, float] = {}
        inter = [0.0]
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or 0)

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.__name__.split(".")[0]
                if func.namespace == "c10d" and name not in ("barrier", "monitored_barrier"):
                    counts[name] = counts.get(name, 0) + 1
                    nbytes, peers = _c10d_bytes(func, name, args, kwargs or {})
                    sent[name] = sent.get(name, 0.0) + nbytes
                    if local and peers:
                        me = dist.get_rank() // local
                        inter[0] += nbytes * sum(p // local != me for p in peers) / len(peers)
                return func(*args, **(kwargs or {}))

        self.counts, self.mode = counts, _Mode()
        self._sent, self._inter = sent, inter

    def bytes(self) -> dict[str, int]:
        """Bytes sent per c10d op, `total`, `inter_node` and `intra_node`."""
        out = {k: int(round(v)) for k, v in self._sent.items()}
        out["total"] = sum(out.values())
        out["inter_node"] = min(int(round(self._inter[0])), out["total"])
        out["intra_node"] = out["total"] - out["inter_node"]
        return out


def _flat_tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in _flat_tensors(x)]
    return []


# c10d ops' positional layout (torch 2.13): the tensors this rank sends are argument 1 (after
# the outputs) except for these, which send their first argument; the process group is the
# one ScriptObject among the arguments, and `send`'s destination follows it.
_SENDS_FIRST = ("allreduce", "broadcast", "send")


def _c10d_bytes(func: Any, name: str, args: tuple, kwargs: dict) -> tuple[float, list[int]]:
    """(bytes this rank sends, the global ranks it sends them to) for one c10d op."""
    at = next((i for i, a in enumerate(args) if isinstance(a, torch.ScriptObject)), None)
    if at is None:
        return 0.0, []
    pg = dist.ProcessGroup.unbox(args[at])
    ranks = dist.get_process_group_ranks(pg)
    n, me = len(ranks), dist.get_rank()
    peers = [r for r in ranks if r != me]
    sent = args[0 if name.startswith(_SENDS_FIRST) else 1]
    size = sum(t.numel() * t.element_size() for t in _flat_tensors(sent))
    if name == "send":  # `dst`: the peer's rank in the group
        return float(size), [ranks[args[at + 1]]]
    if name.startswith(("recv", "gather", "scatter", "reduce_")) and "reduce_scatter" not in name:
        return 0.0, []  # receives, and rooted ops the systems here do not use
    if name.startswith(("allgather", "_allgather")):
        return float(size * (n - 1)), peers  # this rank's input to every peer (ring)
    if name.startswith("allreduce"):
        return 2.0 * size * (n - 1) / n, peers
    return size * (n - 1) / n, peers  # reduce-scatter, all-to-all, broadcast


# -- one rank ----------------------------------------------------------------------------------
def run_system(
    name: str, args: argparse.Namespace, batches: list[tuple[Tensor, Tensor]]
) -> dict[str, Any]:
    """Train `warmup + steps` steps; per-step times (max over ranks), losses (rank mean)."""
    world = dist.get_world_size()
    try:
        runner = build(name, args)
        ok = 1.0
        err = ""
    except SkipSystem as e:
        runner, ok, err = None, 0.0, str(e)
    except Exception as e:  # noqa: BLE001 - report a broken system, go on with the others
        runner, ok, err = None, 0.0, f"failed to build: {type(e).__name__}: {e}"
        if dist.get_rank() == 0:
            traceback.print_exc()
    flag = torch.tensor([ok])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if flag.item() < 1.0:
        return {"skipped": err or "failed on another rank"}

    n = args.warmup + args.steps
    fb_s, step_s, losses = torch.zeros(n, dtype=torch.float64), torch.zeros(n), torch.zeros(n)
    fb_s = fb_s.to(torch.float64)
    held: dict[str, int] = {}
    phase = "step 0"
    try:
        for i in range(n):
            x, y = batches[i]
            phase = f"step {i}: forward and backward"
            dist.barrier()
            t0 = time.perf_counter()
            loss = runner.forward_backward(x, y)
            t1 = time.perf_counter()
            if i == n - 1:  # peak model state: grads present, optimizer state allocated
                h = runner.held()
                held = _as_bytes(h)
            t2 = time.perf_counter()
            phase = f"step {i}: optimizer step"
            runner.step()
            t3 = time.perf_counter()
            fb_s[i], step_s[i] = t1 - t0, t3 - t2
            losses[i] = loss.detach().float().item()
        counter = CollectiveCount()  # one more step, untimed, with every collective counted
        x, y = batches[-1]
        phase = "the extra (counted) step"
        dist.barrier()
        with counter.mode:
            runner.forward_backward(x, y)
            runner.step()
    except Exception as e:
        if not (SYSTEMS[name][0] == "deepspeed" and zeropp_keys(name)):
            raise
        # DeepSpeed's ZeRO++ on CPU may fail inside a step (an op it lacks): the same on
        # every rank, so it is reported like a build failure
        if dist.get_rank() == 0:
            traceback.print_exc()
        return {"skipped": f"failed at {phase}: {type(e).__name__}: {e}"}
    step_s = step_s.to(torch.float64)
    # A step lasts as long as its slowest rank: the whole step's max over ranks, not the sum
    # of the phases' maxima (a rank that finishes backward first waits in step() for the
    # other's last gradients; summing both maxima would count that wait twice).
    times = torch.stack([fb_s, step_s, fb_s + step_s])
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    dist.all_reduce(losses, op=dist.ReduceOp.SUM)
    out: dict[str, Any] = {
        "fb_ms": (times[0, args.warmup :] * 1e3).tolist(),
        "step_ms": (times[1, args.warmup :] * 1e3).tolist(),
        "total_ms": (times[2, args.warmup :] * 1e3).tolist(),
        "losses": (losses / world).tolist(),
        "bytes": held,
        "info": {k: v for k, v in runner.info.items() if not callable(v)},
        "collectives": dict(counter.counts),
        "c10d_bytes": counter.bytes(),
    }
    if "comm" in runner.info:
        out["info"]["comm_bytes_last_step"] = runner.info["comm"]()
    del runner
    return out


def run_interleaved(args: argparse.Namespace, batches: list[tuple[Tensor, Tensor]]
                    ) -> dict[str, list[dict[str, Any]]]:  # fmt: skip
    """Every system built at once and stepped in turn (step i of each, then step i+1), so a
    load change on a shared machine hits all systems alike. Each timed step is reported as
    its own round: the per-round ratios are per-step ratios of neighbouring steps."""
    world = dist.get_world_size()
    runners: dict[str, Runner] = {}
    for s in args.systems:
        try:
            runners[s] = build(s, args)
        except SkipSystem:
            pass
    n = args.warmup + args.steps
    times = {s: torch.zeros(3, n, dtype=torch.float64) for s in runners}
    losses = {s: torch.zeros(n, dtype=torch.float64) for s in runners}
    held: dict[str, dict[str, int]] = {}
    for i in range(n):
        x, y = batches[i]
        for s, runner in runners.items():
            dist.barrier()
            t0 = time.perf_counter()
            loss = runner.forward_backward(x, y)
            t1 = time.perf_counter()
            if i == n - 1:
                held[s] = _as_bytes(runner.held())
            t2 = time.perf_counter()
            runner.step()
            times[s][0, i], times[s][1, i] = t1 - t0, time.perf_counter() - t2
            times[s][2, i] = times[s][0, i] + times[s][1, i]
            losses[s][i] = loss.detach().float().item()
    out: dict[str, list[dict[str, Any]]] = {}
    for s, runner in runners.items():
        counter = CollectiveCount()
        x, y = batches[-1]
        dist.barrier()
        with counter.mode:
            runner.forward_backward(x, y)
            runner.step()
        dist.all_reduce(times[s], op=dist.ReduceOp.MAX)
        dist.all_reduce(losses[s], op=dist.ReduceOp.SUM)
        info = {k: v for k, v in runner.info.items() if not callable(v)}
        if "comm" in runner.info:
            info["comm_bytes_last_step"] = runner.info["comm"]()
        out[s] = [{
            "fb_ms": [float(times[s][0, i]) * 1e3], "step_ms": [float(times[s][1, i]) * 1e3],
            "total_ms": [float(times[s][2, i]) * 1e3],
            "losses": (losses[s] / world).tolist(), "bytes": held[s], "info": info,
            "collectives": dict(counter.counts),
        } for i in range(args.warmup, n)]  # fmt: skip
    for s in args.systems:
        out.setdefault(s, [{"skipped": "not built"}])
    return out


def _worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    if args.local_world_size:  # nodes of that many ranks, as torchrun would say (topology.py)
        local = args.local_world_size
        os.environ.update(LOCAL_WORLD_SIZE=str(local), LOCAL_RANK=str(rank % local),
                          GROUP_RANK=str(rank // local),
                          LOCAL_SIZE=str(local))  # DeepSpeed's CPU accelerator: ranks per node
    warnings.filterwarnings("ignore")
    logging.getLogger("torch.distributed").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=args.timeout))  # fmt: skip
    lang = BigramLanguage(args.vocab, seed=args.seed)
    n = args.warmup + args.steps
    batches = [lang.batch(args.micro_batch, args.seq, (i * world + rank) * 7919 + args.seed)
               for i in range(n)]  # fmt: skip
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in args.systems}
    if args.interleave:
        results = run_interleaved(args, batches)
    for r in range(0 if args.interleave else args.rounds):
        for s in args.systems:
            if results[s] and "skipped" in results[s][0]:
                continue  # skipped in the first round (not installed, refused): stays so
            t0 = time.perf_counter()
            res = run_system(s, args, batches)
            results[s].append(res)
            if rank == 0:
                if "skipped" in res:
                    msg = f"skipped: {res['skipped']}"
                else:
                    ms = statistics.median(res["total_ms"])
                    msg = f"{ms:7.1f} ms/step, loss {res['losses'][-1]:.6f}"
                print(f"[round {r + 1}/{args.rounds}] {s:14s} {msg} "
                      f"({time.perf_counter() - t0:.1f} s)", flush=True)  # fmt: skip
    if rank == 0:
        report(args, results)
    dist.barrier()
    dist.destroy_process_group()


# -- report ------------------------------------------------------------------------------------
def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]]) -> dict:
    rows: dict[str, dict[str, Any]] = {}
    for name, runs in results.items():
        ok = [r for r in runs if "skipped" not in r]
        if not ok:
            rows[name] = {"skipped": runs[0]["skipped"]}
            continue
        total = [a for r in ok for a in r["total_ms"]]
        fb = [a for r in ok for a in r["fb_ms"]]
        st = [a for r in ok for a in r["step_ms"]]
        family, stage, prec = SYSTEMS[name]
        rows[name] = {
            "family": family, "stage": stage, "precision": prec,
            "ms_per_step": statistics.median(total), "p10_ms": _pct(total, 0.1),
            "p90_ms": _pct(total, 0.9), "fwd_bwd_ms": statistics.median(fb),
            "opt_step_ms": statistics.median(st),
            # the measure used before 2026-12-01, kept to compare (see the total's comment)
            "phase_max_sum_ms": statistics.median(
                a + b for r in ok for a, b in zip(r["fb_ms"], r["step_ms"])
            ),
            "round_medians_ms": [statistics.median(r["total_ms"]) for r in ok],
            "best_round_ms": min(statistics.median(r["total_ms"]) for r in ok),
            "bytes": ok[-1]["bytes"], "final_loss": ok[-1]["losses"][-1],
            "losses": ok[-1]["losses"], "info": ok[-1]["info"],
            "collectives": ok[-1].get("collectives", {}),
            "collectives_per_step": sum(ok[-1].get("collectives", {}).values()),
            "c10d_bytes": ok[-1].get("c10d_bytes", {}),
        }  # fmt: skip
    ddp = rows.get("ddp", {}).get("ms_per_step")
    for name, row in rows.items():
        if "skipped" in row:
            continue
        row["vs_ddp"] = row["ms_per_step"] / ddp if ddp else None
        peer = rows.get(zeroshard_peer(name), {}).get("ms_per_step")
        row["vs_zeroshard_same_stage"] = row["ms_per_step"] / peer if peer else None
        # drift between rounds cancels in per-round ratios: their median is the robust one
        ddp_rounds = rows.get("ddp", {}).get("round_medians_ms")
        if ddp_rounds and len(ddp_rounds) == len(row["round_medians_ms"]):
            row["vs_ddp_paired"] = statistics.median(
                a / b for a, b in zip(row["round_medians_ms"], ddp_rounds)
            )
    fp32 = {n: r["losses"] for n, r in rows.items() if r.get("precision") == "fp32"}
    disagreement = None
    if len(fp32) > 1:
        names = list(fp32)
        worst = (0.0, "", "", 0)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                for k, (la, lb) in enumerate(zip(fp32[a], fp32[b])):
                    d = abs(la - lb) / max(abs(la), abs(lb), 1e-12)
                    if d > worst[0]:
                        worst = (d, a, b, k)
        finals = [ls[-1] for ls in fp32.values()]
        disagreement = {
            "max_rel_any_step": worst[0], "between": [worst[1], worst[2]], "at_step": worst[3],
            "max_rel_final": (max(finals) - min(finals)) / max(abs(min(finals)), 1e-12),
            "ok": worst[0] <= args.loss_rtol, "rtol": args.loss_rtol, "systems": names,
        }  # fmt: skip
    return {"rows": rows, "fp32_loss_agreement": disagreement}


def _fmt_ratio(x: float | None) -> str:
    return f"{x:5.2f}" if x is not None else "   - "


def table(summary: dict) -> str:
    head = (
        f"{'system':14s} {'ms/step':>8s} {'p10-p90':>13s} {'fwd+bwd':>8s} {'step':>6s} "
        f"{'/DDP':>5s} {'/DDPr':>5s} {'/zs':>5s} {'coll':>5s} | {'params':>6s} {'grads':>6s} "
        f"{'optst':>6s} {'master':>6s} {'other':>6s} {'total':>6s} MiB | final loss"
    )
    lines = [head, "-" * len(head)]
    for name, r in summary["rows"].items():
        if "skipped" in r:
            lines.append(f"{name:14s} skipped: {r['skipped']}")
            continue
        b = r["bytes"]
        mib = " ".join(f"{b.get(c, 0) / MiB:6.2f}" for c in (*CATEGORIES, "total"))
        lines.append(
            f"{name:14s} {r['ms_per_step']:8.1f} {r['p10_ms']:6.1f}-{r['p90_ms']:<6.1f} "
            f"{r['fwd_bwd_ms']:8.1f} {r['opt_step_ms']:6.1f} {_fmt_ratio(r['vs_ddp'])} "
            f"{_fmt_ratio(r.get('vs_ddp_paired'))} {_fmt_ratio(r['vs_zeroshard_same_stage'])} "
            f"{r.get('collectives_per_step', 0):5d} | {mib} | {r['final_loss']:.6f}"
        )
    lines.append(
        "ms/step: median over all timed steps of all rounds of the slowest rank's step "
        "(fwd+bwd and step: medians of each phase's slowest rank); "
        "/DDP: over DDP's median; /DDPr: median over rounds\nof the per-round ratio to DDP "
        "(machine drift cancels); /zs: over zeroshard at the same stage and precision; "
        "coll: collectives per step (rank 0, one extra counted step). "
        "Bytes: rank 0, after the last backward."
    )
    agree = summary["fp32_loss_agreement"]
    if agree:
        where = (
            f" ({agree['between'][0]} vs {agree['between'][1]}, step {agree['at_step']})"
            if agree["max_rel_any_step"] > 0
            else " (bit-identical)"
        )
        lines.append(
            f"fp32 loss agreement over all {len(agree['systems'])} fp32 systems: max relative "
            f"difference {agree['max_rel_any_step']:.2e} at any step{where}, "
            f"{agree['max_rel_final']:.2e} at the final step (tolerance {agree['rtol']:.0e}): "
            + ("OK" if agree["ok"] else "DISAGREE")
        )
    return "\n".join(lines)


def chart(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {n: r for n, r in summary["rows"].items() if "skipped" not in r}
    names = list(rows)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
    colors = {"ddp": "#777777", "torch-zero": "#9467bd", "fsdp2": "#2ca02c",
              "deepspeed": "#1f77b4", "zeroshard": "#d62728"}  # fmt: skip
    ms = [rows[n]["ms_per_step"] for n in names]
    err = [[rows[n]["ms_per_step"] - rows[n]["p10_ms"] for n in names],
           [rows[n]["p90_ms"] - rows[n]["ms_per_step"] for n in names]]  # fmt: skip
    ax1.bar(names, ms, yerr=err, capsize=3, color=[colors[rows[n]["family"]] for n in names])
    ax1.set_ylabel("ms/step (median, bars p10-p90)")
    ax1.set_title("time per training step")
    bottom = [0.0] * len(names)
    for cat in CATEGORIES:
        vals = [rows[n]["bytes"].get(cat, 0) / MiB for n in names]
        ax2.bar(names, vals, bottom=bottom, label=cat)
        bottom = [a + b for a, b in zip(bottom, vals)]
    ax2.set_ylabel("MiB held on rank 0")
    ax2.set_title("model-state bytes held (rank 0, after the last backward)")
    ax2.set_ylim(0, max(bottom, default=1.0) * 1.3)  # headroom: the legend sits above the bars
    ax2.legend(ncol=3, loc="upper center")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=60)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]]) -> None:
    summary = summarize(args, results)
    numel = sum(p.numel() for p in _model(args).parameters())
    meta = {
        "model": f"TinyGPT n_layer {args.layers} n_embd {args.dim} n_head {args.heads} vocab "
                 f"{args.vocab} seq {args.seq}: {numel} params",
        "params": numel, "world_size": args.ranks, "backend": "gloo", "threads_per_rank": 1,
        "local_world_size": args.local_world_size or args.ranks,
        "micro_batch": args.micro_batch, "steps": args.steps, "warmup": args.warmup,
        "rounds": args.rounds, "bucket": args.bucket, "torch": torch.__version__,
        "stage3_max_reuse_distance": args.max_reuse_distance,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus", "loadavg": os.getloadavg(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }  # fmt: skip
    try:
        import deepspeed

        meta["deepspeed"] = deepspeed.__version__
    except ImportError:
        meta["deepspeed"] = None
    text = table(summary)
    print(f"\n{meta['model']}, {args.ranks} gloo ranks x 1 thread, micro-batch {args.micro_batch}, "
          f"{args.steps} timed steps x {args.rounds} rounds after {args.warmup} warmup\n{text}",
          flush=True)  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_train.json").write_text(json.dumps({"meta": meta, **summary}, indent=1))
    chart(
        summary,
        out / "bench_train.png",
        f"{meta['model']} | {args.ranks} gloo ranks x 1 thread | micro-batch {args.micro_batch}",
    )
    print(f"wrote {out / 'bench_train.json'} and {out / 'bench_train.png'}", flush=True)


# -- entry point -------------------------------------------------------------------------------
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per system and round")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved passes over all systems")
    ap.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), help="comma list of: "
                    + ", ".join(SYSTEMS))  # fmt: skip
    ap.add_argument("--ranks", type=int, default=2, help="gloo ranks to spawn")
    ap.add_argument("--local-world-size", type=int, default=0,
                    help="ranks per simulated node (torchrun's LOCAL_WORLD_SIZE); 0: one node")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 steps, 1 warmup, 1 round")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096, help="4096: 4.24M params with the rest")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument(
        "--bucket",
        type=int,
        default=2_000_000,
        help="reduce/allgather bucket size (elements), same for DeepSpeed/zeroshard",
    )
    ap.add_argument("--max-reuse-distance", type=int, default=100_000_000,
                    help="stage3_max_reuse_distance (elements) for both DeepSpeed and zeroshard")
    ap.add_argument("--interleave", action="store_true",
                    help="build every system at once and alternate them step by step")
    ap.add_argument("--loss-rtol", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=300, help="gloo collective timeout (s)")
    args = ap.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in args.systems if s not in SYSTEMS]
    if unknown:
        ap.error(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    if args.quick:
        args.steps, args.warmup, args.rounds = 3, 1, 1
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args: argparse.Namespace) -> None:
    """Run every system of `args` on `args.ranks` spawned gloo ranks; rank 0 writes the
    report."""
    mp.spawn(_worker, args=(args.ranks, _free_port(), args), nprocs=args.ranks, join=True)


def main(argv: list[str] | None = None) -> None:
    spawn(parse(argv))


if __name__ == "__main__":
    main()

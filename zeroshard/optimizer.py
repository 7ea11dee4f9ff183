"""`ZeroOptimizer`: a `torch.optim.Optimizer` whose state, master weights and (stage 2)
gradients are sharded across ranks; at stage 3 the parameters too.

Reading order for a newcomer: a stage (`Sharding`: shard/flat.py for stages 0-2,
stage3/sharding.py for stage 3) turns each (param group, dtype) into a `ShardGroup`
(shard/group.py): this rank's pieces of the parameters, where their gradients come from, the
fp32 master and the optimizer state. `step()` below is the same at every stage: global
gradient norm, clipping, inf/nan skip, one update per shard group, then the stage makes the
updated shards visible (`gather_params`). fp16 loss scaling lives in precision.py, byte
accounting in accounting.py.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from zeroshard import guards, torch_clip
from zeroshard.accounting import memory_report
from zeroshard.comm.collectives import Comm
from zeroshard.precision import LossScaler
from zeroshard.quant8.codec import codec_for, group_codec, group_defaults
from zeroshard.shard.codec import FP32, StateCodec
from zeroshard.shard.flat import FlatSharding
from zeroshard.shard.group import ShardGroup
from zeroshard.shard.layout import ParamLayout, ShardGroupLayout, ShardLayout, ShardState
from zeroshard.shard.offload import HostOffload
from zeroshard.shard.optimizer_state import load_optimizer_state_dict, optimizer_state_dict
from zeroshard.shard.placement import ON_DEVICE, Placement
from zeroshard.shard.sharding import Sharding
from zeroshard.update import apply as update
from zeroshard.update.rules import RULE_DEFAULTS, resolve_rule

log = logging.getLogger("zeroshard")


def check_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"zeroshard trains fp32, bf16 or fp16 parameters, not {dtype}")


class ZeroOptimizer(torch.optim.Optimizer):
    """Drop-in for `torch.optim.AdamW` & co. that shards optimizer memory across ranks.

    Args:
        params: parameters or param-group dicts, as for any torch optimizer. Parameters with
            `requires_grad=False` are left alone.
        optimizer: "adamw", "adam", "sgd", "lion", "adamw8bit" (AdamW with blockwise 8-bit
            states: hyperparams block_size=256, min_8bit_size=4096), or a
            `torch.optim.Optimizer` subclass (run on this rank's flat shard; its state is
            sharded too).
        stage: 0 (replicated, DDP-like), 1 (optimizer state + fp32 master sharded) or 2
            (+ gradients reduce-scattered as backward runs); stage 3 comes from
            `zeroshard.initialize`, which passes its `sharding`.
        process_group: ranks to shard across (default: the whole world).
        reduce_bucket_size: elements per bucket of the gradient reduction.
        allgather_bucket_size: elements of parameter all-gathers in flight at once.
        overlap_comm: reduce during backward, not after it.
        overlap_param_gather: stages 1-2: `step()` returns with the updated parameters'
            all-gather in flight; each bucket is waited for when the first module that reads
            it starts its forward (shard/param_gather.py). Needs `model`. Read a parameter
            outside a forward before that only after `finish_param_gather()`.
        model: the model the parameters belong to (optional): its names label `layout()`,
            and with `overlap_param_gather` its `state_dict()` waits for the gather.
        gradient_clipping: max global gradient norm applied in `step()` (0: off).
        gradient_accumulation_steps: micro-steps per step: `backward()` divides the loss by it,
            and stage 0/1 reduce once per step instead of once per backward.
        reduce_dtype: dtype gradients are averaged in (default: fp32, fp16 for fp16 params).
        loss_scaler: fp16 loss scaling (`LossScaler`); default dynamic for fp16 params.
        kernel: "auto" | "triton" | "torch": the update backend (see update.py).
        codec: how optimizer state is stored (`zeroshard.shard.StateCodec`; fp32 default).
        placement: where master and state live (`zeroshard.shard.Placement`; the device).
        sharding: a prepared stage (`zeroshard.shard.Sharding`); built from `stage` if None.
        **hyperparams: lr, betas, eps, weight_decay, amsgrad, momentum, ... per rule.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        optimizer: str | type[torch.optim.Optimizer] = "adamw",
        stage: int = 2,
        *,
        process_group: dist.ProcessGroup | None = None,
        reduce_bucket_size: int = 500_000_000,
        allgather_bucket_size: int = 500_000_000,
        overlap_comm: bool = True,
        overlap_param_gather: bool = False,
        model: torch.nn.Module | None = None,
        gradient_clipping: float = 0.0,
        gradient_accumulation_steps: int = 1,
        reduce_dtype: torch.dtype | None = None,
        loss_scaler: LossScaler | None = None,
        kernel: str = "auto",
        codec: StateCodec = FP32,
        placement: Placement = ON_DEVICE,
        sharding: Sharding | None = None,
        **hyperparams: Any,
    ) -> None:
        if gradient_accumulation_steps < 1:
            raise ValueError("gradient_accumulation_steps must be >= 1")
        guards.check_world_env(process_group)  # torchrun without a process group: not alone
        if sharding is None:
            if stage not in (0, 1, 2):
                hint = " (stage 3 shards the model: use zeroshard.initialize)" if stage == 3 else ""
                raise ValueError(f"ZeroOptimizer stage must be 0, 1 or 2, got {stage!r}{hint}")
            sharding = FlatSharding(
                Comm(process_group), stage, reduce_dtype=reduce_dtype,
                overlap_comm=overlap_comm, accumulation_steps=gradient_accumulation_steps,
                bucket_numel=reduce_bucket_size, allgather_bucket_size=allgather_bucket_size,
                overlap_param_gather=overlap_param_gather, model=model,
            )  # fmt: skip
        # "adamw8bit": block_size / min_8bit_size build its codec (quant8/codec.py)
        codec, hyperparams = codec_for(optimizer, hyperparams, codec)
        self.rule, defaults, self._generic_cls = resolve_rule(optimizer, hyperparams)
        defaults.update(group_defaults(codec))  # adamw8bit: a param group may set its own
        self.sharding = sharding
        self.stage = sharding.stage
        self.comm = sharding.comm
        self.codec = codec
        self.placement = placement
        self.kernel = kernel
        self.gradient_clipping = float(gradient_clipping)
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.loss_scaler = loss_scaler
        self.lr_scheduler = None  # set by zeroshard.initialize from the config
        self.timer: Any = None  # a phase timer (timing.py) when the config asks for one
        self.shard_groups: list[ShardGroup] = []
        self._pending_stats: Tensor | None = None
        self._pending_clip: float | None = None
        self.skipped_steps = 0
        self.last_grad_norm: float | None = None
        super().__init__(params, defaults)
        guards.check_trainable(self)  # all-frozen params are an error, not a crash at step 1
        torch_clip.install()  # torch's clip_grad_norm_ clips by the global norm

    # -- building -------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        gi = len(self.param_groups) - 1
        params = self.param_groups[-1]["params"]
        guards.on_param_group(self, params)
        trainable = [p for p in params if p.requires_grad]
        for p in trainable:
            check_dtype(p.dtype)
        codec = group_codec(self.codec, self.param_groups[gi], f"param_groups[{gi}]")
        for group in self.sharding.build_groups(gi, trainable, codec, self.placement):
            if group.dtype == torch.float16 and self.loss_scaler is None:
                self.loss_scaler = LossScaler()
            options = {k: v for k, v in self.param_groups[gi].items() if k != "params"}
            hp = self._hyperparams(self.param_groups[gi])
            group.init_state(self.rule, hp, self._generic_cls, options)
            self.shard_groups.append(group)

    def _hyperparams(self, group: dict[str, Any]) -> dict[str, Any]:
        return {k: group[k] for k in RULE_DEFAULTS.get(self.rule, {}) if k in group}

    def _phase(self, name: str) -> contextlib.AbstractContextManager:
        return self.timer.phase(name) if self.timer is not None else contextlib.nullcontext()

    # -- the training-loop API --------------------------------------------------------------
    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.scale if self.loss_scaler is not None else 1.0

    def backward(self, loss: Tensor, **kwargs: Any) -> None:
        """`loss.backward()` with fp16 loss scaling and 1/gradient_accumulation_steps applied
        (DeepSpeed's `engine.backward` semantics). Fine to use at every precision."""
        scale = self.loss_scale / self.gradient_accumulation_steps
        with self._phase("backward"):
            (loss * scale if scale != 1.0 else loss).backward(**kwargs)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient buffers (they stay allocated); parameters' `.grad` stay None:
        gradients live in the optimizer's buffers after backward."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.zero_()
        self.sharding.grads.zero_grad()
        self._pending_stats = None
        self._pending_clip = None

    def _grad_stats(self) -> Tensor:
        """Global [sum of squares, non-finite count] of this step's averaged gradients."""
        if self._pending_stats is None:
            with self._phase("reduce"):
                self.sharding.grads.finish()
            pieces = [g for group in self.shard_groups for g in group.grads()]
            stats = update.grad_stats(pieces, backend=self.kernel).to(torch.float64)
            if self.sharding.grads.sharded:  # shards are disjoint: sum; stage 0's are replicas
                self.comm.all_reduce(stats, op="sum")
            self._pending_stats = stats
        return self._pending_stats

    def _global_norm(self) -> tuple[float, bool]:
        """(true, loss-scale-free global gradient norm; whether every gradient is finite)."""
        sumsq, nonfinite = self._grad_stats().tolist()
        return math.sqrt(max(sumsq, 0.0)) / self.loss_scale, nonfinite == 0

    @staticmethod
    def _clip_coef(max_norm: float, norm: float) -> float:
        """torch.nn.utils.clip_grad_norm_'s coefficient, clamped to 1."""
        return min(1.0, max_norm / (norm + 1e-6)) if math.isfinite(norm) else 1.0

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip by the global norm over every rank's shard; returns that (unscaled) norm."""
        norm, finite = self._global_norm()
        if not finite:
            norm = float("inf")
        self._pending_clip = self._clip_coef(max_norm, norm)
        return torch.tensor(norm)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with self._phase("step"):
            self._step()
        if self.timer is not None:
            self.timer.end_step()
        return loss

    def finish_param_gather(self) -> None:
        """Wait for the last step's parameter all-gather if it is still in flight
        (`overlap_param_gather`): every parameter holds its updated values after this."""
        self.sharding.finish_param_gather()

    def _step(self) -> None:
        self.finish_param_gather()  # the update writes the chunks the last gather sends
        guards.before_step(self)  # a late process group, moved params, a DDP wrapper
        norm, finite = self._global_norm()
        if not finite:
            self._skip_step()
            return
        self.last_grad_norm = norm
        coef = self._pending_clip
        if coef is None and self.gradient_clipping > 0:
            coef = self._clip_coef(self.gradient_clipping, norm)
        grad_scale = (coef if coef is not None else 1.0) / self.loss_scale
        for group in self.shard_groups:
            options = self.param_groups[group.group]
            group.update(self.rule, options, self._hyperparams(options), grad_scale, self.kernel)
        self.sharding.gather_params()
        if self.loss_scaler is not None:
            self.loss_scaler.update(False)
        self._end_step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()

    def _skip_step(self) -> None:
        self.skipped_steps += 1
        scale = self.loss_scale
        if self.loss_scaler is not None:
            self.loss_scaler.update(True)
        log.warning(
            "rank %d: non-finite gradients, step skipped (loss scale %g -> %g)",
            self.comm.rank, scale, self.loss_scale,
        )  # fmt: skip
        self._end_step()

    def _end_step(self) -> None:
        self.sharding.grads.end_step()
        self.sharding.grads.zero_grad()  # step() consumes the gradients, as in DeepSpeed
        self._pending_stats = None
        self._pending_clip = None
        self.comm.counter.snapshot()

    # -- the public shard layout (layout.py) ---------------------------------------------------
    @property
    def process_group(self) -> dist.ProcessGroup | None:
        """The ranks this optimizer shards over (None: the whole world)."""
        return self.comm.group

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    def trainable_params(self) -> Iterator[tuple[int, Tensor]]:
        """(param group, parameter) for every trainable parameter, once, in group order."""
        seen: set[int] = set()
        for gi, g in enumerate(self.param_groups):
            for p in g["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    yield gi, p

    def layout(self, model: torch.nn.Module | None = None) -> ShardLayout:
        """Which slice of which parameter each rank holds (names from `model` when given)."""
        model = model if model is not None else self.sharding.model
        names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        index = {id(p): i for i, (_, p) in enumerate(self.trainable_params())}
        groups, params = [], []
        for si, g in enumerate(self.shard_groups):
            groups.append(ShardGroupLayout(si, g.group, g.dtype, g.shard_numel, g.num_shards))
            for h in g.held_params():
                p = h.param
                params.append(ParamLayout(
                    index[id(p)], names.get(id(p)), h.shape, g.dtype, g.group, si,
                    h.flat_offset, h.pieces,
                ))  # fmt: skip
        params.sort(key=lambda p: p.index)
        return ShardLayout(self.stage, self.comm.world_size, self.comm.rank, tuple(groups),
                           tuple(params))  # fmt: skip

    def shard_state(self, i: int) -> ShardState:
        """Live fp32 tensors of shard group i on this rank. Write into them to load, then call
        `sync_params_from_master()` (which also stores state a codec keeps in another form)."""
        self.finish_param_gather()  # the caller reads or writes the shards
        g = self.shard_groups[i]
        if g.coded:  # decoded only if read: checkpoints move the stored form as it is
            return ShardState(list(g.master), g.lazy_state(), g.step, g.generic,
                              g.piece_states, tuple(sorted(g.stored)))  # fmt: skip
        return ShardState(list(g.master), g.state(), g.step, g.generic)

    def set_step(self, i: int, step: int) -> None:
        """Restore the update count of shard group i (a checkpoint load)."""
        self.shard_groups[i].step = int(step)

    @torch.no_grad()
    def sync_params_from_master(self) -> None:
        """After master pieces were written in place: states are stored, the parameters'
        shards follow the master, and the stage gathers them where forward reads them."""
        self.finish_param_gather()
        for g in self.shard_groups:
            g.commit()
        self.sharding.gather_params()

    # -- accounting -----------------------------------------------------------------------
    def memory_report(self, memory: str = "all") -> dict[str, int]:
        """Bytes held on this rank: params, grads, master, optimizer_states, comm_buffers,
        `total`, and how much of it is `device` and `host` memory (offload). `memory` =
        "device" or "host" reports only that memory, per category."""
        held = self.sharding.held_tensors()
        master = [m for g in self.shard_groups for m in g.master]
        states = [t for g in self.shard_groups for t in g.stored_tensors()]
        host = list(held.get("host", []))  # offloaded stage-3 parameter shards
        staged: list[Tensor] = []
        if isinstance(self.placement, HostOffload):  # master, state and staged gradients
            host += [*master, *states]
            staged = self.placement.staging_buffers()
        report = memory_report(
            {**held, "grads": [*held.get("grads", []), *staged], "master": master,
             "optimizer_states": states},
            host=[*host, *staged], memory=memory,
        )  # fmt: skip
        if held.get("hpz_secondary") is not None:  # part of `params`: ZeRO++'s hpZ copies
            report["hpz_secondary"] = sum(t.numel() * t.element_size()
                                          for t in held["hpz_secondary"])  # fmt: skip
        return report

    def comm_report(self) -> dict[str, int]:
        """Bytes this rank sent during the last step, per collective, and `total`."""
        return dict(self.comm.counter.last) or self.comm.counter.snapshot()

    # -- checkpoints (same world size) ------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return optimizer_state_dict(self)  # reads through shard_state: gathers finished

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        load_optimizer_state_dict(self, state_dict)

"""`ZeroOptimizer`: a `torch.optim.Optimizer` whose state, master weights and (stage 2)
gradients are sharded across ranks.

Reading order for a newcomer: parameters are packed into `FlatParams` (flat_buffer.py); their
gradients are moved and averaged by `GradReducer` (grad_reducer.py); `step()` below updates
this rank's chunk through one call per rule (update.py) and all-gathers the result back into
the parameters. fp16 loss scaling lives in precision.py, byte accounting in accounting.py.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import guards, torch_clip, update
from .accounting import memory_report
from .collectives import Comm, wait_all
from .flat_buffer import FlatParams
from .grad_reducer import GradPath, GradReducer
from .layout import ParamLayout, ShardGroupLayout, ShardLayout, ShardState
from .precision import LossScaler
from .rules import RULE_DEFAULTS, resolve_rule

log = logging.getLogger("zeroshard")


def check_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"zeroshard trains fp32, bf16 or fp16 parameters, not {dtype}")


@dataclass
class _Entry:
    """One (param group, dtype) unit: its flat params, fp32 master chunks and update state."""

    group: int
    dtype: torch.dtype  # the parameters' dtype
    master: list[Tensor]  # fp32 pieces this rank updates (views of the params when fp32)
    master_shard: Tensor | None  # the contiguous fp32 copy when params are bf16/fp16
    model_copies: list[Tensor] | None  # low-precision chunks the update writes, else None
    flat: FlatParams | None = None  # stages 0-2: the packed parameters (stage 3: in units)
    state: dict[str, list[Tensor]] = field(default_factory=dict)
    step: int = 0
    generic: torch.optim.Optimizer | None = None  # a torch optimizer run on the pieces


class ZeroOptimizer(torch.optim.Optimizer):
    """Drop-in for `torch.optim.AdamW` & co. that shards optimizer memory across ranks.

    Args:
        params: parameters or param-group dicts, as for any torch optimizer. Parameters with
            `requires_grad=False` are left alone.
        optimizer: "adamw", "adam", "sgd", "lion", or a `torch.optim.Optimizer` subclass
            (run on this rank's flat shard; its state is sharded too).
        stage: 0 (replicated, DDP-like), 1 (optimizer state + fp32 master sharded) or 2
            (+ gradients reduce-scattered as backward runs).
        process_group: ranks to shard across (default: the whole world).
        reduce_bucket_size: elements per bucket of the gradient reduction.
        allgather_bucket_size: elements of parameter all-gathers in flight at once.
        overlap_comm: reduce during backward, not after it.
        gradient_clipping: max global gradient norm applied in `step()` (0: off).
        gradient_accumulation_steps: micro-steps per step: `backward()` divides the loss by it,
            and stage 0/1 reduce once per step instead of once per backward.
        reduce_dtype: dtype gradients are averaged in (default: fp32, fp16 for fp16 params).
        loss_scaler: fp16 loss scaling (`LossScaler`); default dynamic for fp16 params.
        kernel: "auto" | "triton" | "torch": the update backend (see update.py).
        **hyperparams: lr, betas, eps, weight_decay, amsgrad, momentum, ... per rule.
    """

    _STAGES: tuple[int, ...] = (0, 1, 2)  # stage 3's optimizer (zeroshard.stage3) widens it

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
        gradient_clipping: float = 0.0,
        gradient_accumulation_steps: int = 1,
        reduce_dtype: torch.dtype | None = None,
        loss_scaler: LossScaler | None = None,
        kernel: str = "auto",
        **hyperparams: Any,
    ) -> None:
        if stage not in self._STAGES:
            hint = " (stage 3 shards parameters: use zeroshard.initialize)" if stage == 3 else ""
            raise ValueError(f"ZeroOptimizer stage must be 0, 1 or 2, got {stage!r}{hint}")
        if gradient_accumulation_steps < 1:
            raise ValueError("gradient_accumulation_steps must be >= 1")
        self.rule, defaults, self._generic_cls = resolve_rule(optimizer, hyperparams)
        guards.check_world_env(process_group)  # torchrun without a process group: not alone
        self.stage = stage
        self.comm = Comm(process_group)
        self.kernel = kernel
        self.gradient_clipping = float(gradient_clipping)
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.allgather_bucket_size = int(allgather_bucket_size)
        self._bucket_numel = int(reduce_bucket_size)
        self._explicit_reduce_dtype = reduce_dtype
        self.loss_scaler = loss_scaler
        self.lr_scheduler = None  # set by zeroshard.initialize from the config
        self._entries: list[_Entry] = []
        self._reducer: GradPath | None = None  # the stage's gradient path
        self._pending_stats: Tensor | None = None
        self._pending_clip: float | None = None
        self.skipped_steps = 0
        self.last_grad_norm: float | None = None
        self._overlap = overlap_comm
        super().__init__(params, defaults)
        guards.check_trainable(self)  # issue 8: all-frozen params are an error, not a crash
        torch_clip.install()  # issue 8: torch's clip_grad_norm_ clips by the global norm

    # -- building -------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group_index = len(self.param_groups) - 1
        trainable = [p for p in self.param_groups[-1]["params"] if p.requires_grad]
        guards.on_param_group(self, self.param_groups[-1]["params"])  # issue 8: checks
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for p in trainable:
            by_dtype.setdefault(p.dtype, []).append(p)
        for dtype, params in by_dtype.items():
            self._add_entry(group_index, dtype, params)

    def _add_entry(self, group_index: int, dtype: torch.dtype, params: list[Tensor]) -> None:
        if self._reducer is None:
            self._reducer = GradReducer(
                self.comm, self.stage, self._explicit_reduce_dtype, self._overlap,
                self.gradient_accumulation_steps,
            )  # fmt: skip
        check_dtype(dtype)
        # stage 0 replicates: one shard, and every rank owns all of it
        sharded = self._reducer.sharded
        num_shards, shard = (self.comm.world_size, self.comm.rank) if sharded else (1, 0)
        flat = FlatParams(params, num_shards, shard, self._bucket_numel)
        guards.broadcast_from_rank0(self.comm, [flat.flat])  # issue 8: rank 0's initial weights
        self._append_entry(group_index, dtype, flat.own_chunks(flat.flat), flat)
        self._reducer.add(flat)

    def _append_entry(self, group_index: int, dtype: torch.dtype, shard: list[Tensor],
                      flat: FlatParams | None = None) -> _Entry:  # fmt: skip
        """An update unit over `shard`, this rank's pieces of the parameters (every stage):
        fp32 pieces are the master themselves; bf16/fp16 ones get a contiguous fp32 copy."""
        if dtype == torch.float16 and self.loss_scaler is None:
            self.loss_scaler = LossScaler()
        if dtype == torch.float32:
            master, master_shard, copies = list(shard), None, None  # the params are the master
        else:
            numel = sum(t.numel() for t in shard)
            master_shard = torch.empty(numel, dtype=torch.float32, device=shard[0].device)
            master = list(master_shard.split([t.numel() for t in shard]))
            for m, c in zip(master, shard):
                m.copy_(c)
            copies = list(shard)
        entry = _Entry(group_index, dtype, master, master_shard, copies, flat=flat)
        hp = self._hyperparams(self.param_groups[group_index])
        if self._generic_cls is None:
            entry.state = update.init_state(self.rule, hp, master)
        else:
            entry.generic = self._make_generic(entry)
        self._entries.append(entry)
        return entry

    def _make_generic(self, entry: _Entry) -> torch.optim.Optimizer:
        group = {k: v for k, v in self.param_groups[entry.group].items() if k != "params"}
        return self._generic_cls([{"params": entry.master, **group}])

    def _hyperparams(self, group: dict[str, Any]) -> dict[str, Any]:
        return {k: group[k] for k in RULE_DEFAULTS.get(self.rule, {}) if k in group}

    # -- the training-loop API --------------------------------------------------------------
    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.scale if self.loss_scaler is not None else 1.0

    def backward(self, loss: Tensor, **kwargs: Any) -> None:
        """`loss.backward()` with fp16 loss scaling and 1/gradient_accumulation_steps applied
        (DeepSpeed's `engine.backward` semantics). Fine to use at every precision."""
        scale = self.loss_scale / self.gradient_accumulation_steps
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
        if self._reducer is not None:
            self._reducer.zero_grad()
        self._pending_stats = None
        self._pending_clip = None

    def _grad_stats(self) -> Tensor:
        """Global [sum of squares, non-finite count] of this step's averaged gradients."""
        if self._pending_stats is None:
            self._reducer.finish()
            pieces = [g for i in range(len(self._entries)) for g in self._reducer.grad_pieces(i)]
            stats = update.grad_stats(pieces, backend=self.kernel).to(torch.float64)
            if self._reducer.sharded:  # shards are disjoint: sum them; stage 0's are replicas
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
        guards.before_step(self)  # issue 8: late process group, moved params, DDP wrapper
        norm, finite = self._global_norm()
        if not finite:
            self._skip_step()
            return loss
        self.last_grad_norm = norm
        coef = self._pending_clip
        if coef is None and self.gradient_clipping > 0:
            coef = self._clip_coef(self.gradient_clipping, norm)
        grad_scale = (coef if coef is not None else 1.0) / self.loss_scale

        for i, entry in enumerate(self._entries):
            self._update_entry(entry, self._reducer.grad_pieces(i), grad_scale)
        self._gather_params()
        if self.loss_scaler is not None:
            self.loss_scaler.update(False)
        self._end_step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        return loss

    def _update_entry(self, entry: _Entry, grads: list[Tensor], grad_scale: float) -> None:
        group = self.param_groups[entry.group]
        entry.step += 1
        if entry.generic is not None:
            inner = entry.generic.param_groups[0]
            for k, v in group.items():
                if k != "params":
                    inner[k] = v
            for m, g in zip(entry.master, grads):
                m.grad = g.to(torch.float32) * grad_scale if grad_scale != 1.0 else g.float()
            entry.generic.step()
            for m in entry.master:
                m.grad = None
            if entry.model_copies is not None:
                for c, m in zip(entry.model_copies, entry.master):
                    c.copy_(m)
            return
        update.apply_update(
            self.rule, entry.master, grads, entry.state,
            lr=float(group["lr"]), step=entry.step, hp=self._hyperparams(group),
            grad_scale=grad_scale if grad_scale != 1.0 else None,
            model_copies=entry.model_copies, backend=self.kernel,
        )  # fmt: skip

    def _gather_params(self) -> None:
        """Every rank updated its chunks; all-gather them back into the full parameters."""
        if not self._reducer.sharded:  # stage 0: every rank updated everything
            return
        works: list = []
        in_flight = 0
        for entry in self._entries:
            flat = entry.flat
            for bucket, chunk in zip(flat.buckets, flat.own_chunks(flat.flat)):
                full = flat.bucket_view(flat.flat, bucket)
                works.append(self.comm.all_gather(full, chunk, async_op=True))
                in_flight += full.numel()
                if in_flight >= self.allgather_bucket_size:
                    wait_all(works)
                    in_flight = 0
        wait_all(works)

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
        self._reducer.end_step()
        self._reducer.zero_grad()  # issue 8: step() consumes the gradients (as DeepSpeed)
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

    def _param_index(self) -> dict[int, tuple[int, int]]:
        """id(param) -> (position in the trainable-parameter order, param group)."""
        out: dict[int, tuple[int, int]] = {}
        for gi, g in enumerate(self.param_groups):
            for p in g["params"]:
                if p.requires_grad and id(p) not in out:
                    out[id(p)] = (len(out), gi)
        return out

    def _shard_group_numel(self, i: int) -> tuple[int, int]:
        """(shard numel, number of shards) of shard group i."""
        flat = self._entries[i].flat
        return flat.shard_numel, flat.num_shards

    def _param_layouts(self, names: dict[int, str]) -> list[ParamLayout]:
        index = self._param_index()
        out = []
        for si, e in enumerate(self._entries):
            plan = e.flat.plan
            for slot, sp in zip(e.flat.slots, plan.slots):
                pos, gi = index[id(slot.param)]
                out.append(ParamLayout(
                    pos, names.get(id(slot.param)), tuple(slot.param.shape), slot.param.dtype,
                    gi, si, slot.offset, tuple(plan.pieces(sp)),
                ))  # fmt: skip
        return out

    def _model_names(self, model: torch.nn.Module | None) -> dict[int, str]:
        if model is None:
            return {}
        return {id(p): n for n, p in model.named_parameters()}

    def layout(self, model: torch.nn.Module | None = None) -> ShardLayout:
        """Which slice of which parameter each rank holds (names from `model` when given)."""
        groups = []
        for i, e in enumerate(self._entries):
            numel, shards = self._shard_group_numel(i)
            groups.append(ShardGroupLayout(i, e.group, e.dtype, numel, shards))
        params = sorted(self._param_layouts(self._model_names(model)), key=lambda p: p.index)
        return ShardLayout(self.stage, self.comm.world_size, self.comm.rank, tuple(groups),
                           tuple(params))  # fmt: skip

    def shard_state(self, i: int) -> ShardState:
        """Live tensors of shard group i on this rank (write into them to load)."""
        e = self._entries[i]
        state = dict(e.state)
        if e.generic is not None:
            per = [e.generic.state.get(m, {}) for m in e.master]
            for name in per[0] if per else ():
                if all(torch.is_tensor(s.get(name)) for s in per):
                    state[name] = [s[name] for s in per]
        return ShardState(list(e.master), state, e.step, e.generic)

    def set_step(self, i: int, step: int) -> None:
        """Restore the update count of shard group i (a checkpoint load)."""
        self._entries[i].step = int(step)

    @torch.no_grad()
    def sync_params_from_master(self) -> None:
        """After master pieces were written in place: the bf16/fp16 model copies follow, and
        every rank's full parameters are all-gathered (stage 3: persistent units only)."""
        for e in self._entries:
            if e.model_copies is not None:
                for c, m in zip(e.model_copies, e.master):
                    c.copy_(m)
        self._gather_params()

    # -- accounting -----------------------------------------------------------------------
    def _held_tensors(self) -> dict[str, list[Tensor]]:
        """The parameter, gradient and communication tensors this rank holds."""
        held = self._reducer.held_tensors() if self._reducer else {}
        return {
            "params": [e.flat.flat for e in self._entries],
            "grads": held.get("grads", []),
            "comm_buffers": held.get("comm_buffers", []),
        }

    def memory_report(self) -> dict[str, int]:
        """Bytes held on this rank: params, grads, master, optimizer_states, comm_buffers."""
        held = self._held_tensors()
        states: list[Tensor] = []
        for e in self._entries:
            if e.generic is not None:
                for st in e.generic.state.values():
                    states += [v for v in st.values() if torch.is_tensor(v)]
            for ts in e.state.values():
                states += list(ts)
        return memory_report(
            {
                **held,
                "master": [m for e in self._entries for m in e.master],
                "optimizer_states": states,
            }
        )

    def comm_report(self) -> dict[str, int]:
        """Bytes this rank sent during the last step, per collective, and `total`."""
        return dict(self.comm.counter.last) or self.comm.counter.snapshot()

    # -- checkpoints (same world size) ------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        from .checkpoint.optimizer_state import optimizer_state_dict

        return optimizer_state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from .checkpoint.optimizer_state import load_optimizer_state_dict

        load_optimizer_state_dict(self, state_dict)

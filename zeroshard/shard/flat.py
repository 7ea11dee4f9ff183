"""Stages 0-2 as a builder of shard groups: parameters packed into flat buffers.

Each (param group, dtype) becomes one `FlatParams` (the parameters become views of one flat
buffer, laid out by `layout.plan_buckets`) and one `ShardGroup` over this rank's chunks of it.
Gradients come from `GradReducer` (all-reduced at stage 0, reduce-scattered at stages 1-2);
after the update every rank's chunks are all-gathered back into the full parameters (stages
1-2; at stage 0 every rank updated everything), at once or, with `overlap_param_gather`,
behind the next forward (param_gather.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from zeroshard import guards
from zeroshard.comm.collectives import Comm, wait_all
from zeroshard.shard.codec import StateCodec, alignment_of
from zeroshard.shard.flat_buffer import FlatParams
from zeroshard.shard.grad_reducer import GradReducer
from zeroshard.shard.group import HeldParam, ShardGroup
from zeroshard.shard.param_gather import DeferredParamGather, bucket_gathers
from zeroshard.shard.placement import GradLanding, Placement


class FlatSharding:
    """Builds and serves the shard groups of stages 0, 1 and 2."""

    def __init__(
        self, comm: Comm, stage: int, *, reduce_dtype: torch.dtype | None, overlap_comm: bool,
        accumulation_steps: int, bucket_numel: int, allgather_bucket_size: int,
        overlap_param_gather: bool = False, model: nn.Module | None = None,
    ) -> None:  # fmt: skip
        if stage not in (0, 1, 2):
            raise ValueError(f"flat sharding covers stages 0, 1 and 2, got {stage}")
        self.stage = stage
        self.comm = comm
        self.model = model  # parameter names come from the caller's model, when given
        self.grads = GradReducer(comm, stage, reduce_dtype, overlap_comm, accumulation_steps)
        self.bucket_numel = int(bucket_numel)
        self.allgather_bucket_size = int(allgather_bucket_size)
        self.flats: list[FlatParams] = []
        self._groups: list[ShardGroup] = []
        self.deferred = None
        if overlap_param_gather:
            if stage == 0 or model is None:
                raise ValueError(
                    "overlap_param_gather applies to stages 1 and 2 and needs the model "
                    f"(stage {stage}, model {'given' if model is not None else 'not given'}): "
                    "ZeroOptimizer(..., stage=2, overlap_param_gather=True, model=model), so "
                    "that model.state_dict() waits for the gather"
                )
            self.deferred = DeferredParamGather(comm, model)

    def build_groups(
        self, group_index: int, params: list[Tensor], codec: StateCodec, placement: Placement
    ) -> list[ShardGroup]:
        """One shard group per dtype among `params` (a param group's trainable parameters)."""
        if self.deferred is not None:
            _check_in_model(self.deferred.model, group_index, params)
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for p in params:
            by_dtype.setdefault(p.dtype, []).append(p)
        if isinstance(placement, GradLanding):  # host offload: copy buckets in as they land
            self.grads.watch(placement)
        out = []
        sharded = self.grads.sharded  # stage 0 replicates: one shard, every rank owns it all
        num_shards, shard = (self.comm.world_size, self.comm.rank) if sharded else (1, 0)
        for dtype, members in by_dtype.items():
            flat = FlatParams(members, num_shards, shard, self.bucket_numel, alignment_of(codec))
            guards.broadcast_from_rank0(self.comm, [flat.flat])  # every rank starts as rank 0
            fi = len(self.flats)
            self.flats.append(flat)
            self.grads.add(flat)
            if self.deferred is not None:
                self.deferred.add(flat)
            group = ShardGroup(
                group=group_index, dtype=dtype, shard=flat.own_chunks(flat.flat),
                grads=lambda fi=fi: self.grads.grad_pieces(fi),
                describe=lambda flat=flat: _describe(flat),
                shard_numel=flat.shard_numel, num_shards=flat.num_shards,
                codec=codec, placement=placement, shard_index=shard,
            )  # fmt: skip
            self._groups.append(group)
            out.append(group)
        return out

    def gather_params(self) -> None:
        """Every rank updated its chunks; all-gather them back into the full parameters,
        at most `allgather_bucket_size` elements in flight; or launch them all and return,
        each to be waited for by the first module that reads it (`overlap_param_gather`)."""
        if not self.grads.sharded:
            return
        if self.deferred is not None:
            self.deferred.launch()
            return
        works: list = []
        in_flight = 0
        for flat in self.flats:
            for numel, work in bucket_gathers(self.comm, flat):
                works.append(work)
                in_flight += numel
                if in_flight >= self.allgather_bucket_size:
                    wait_all(works)
                    in_flight = 0
        wait_all(works)

    def finish_param_gather(self) -> None:
        """Wait for a deferred parameter all-gather still in flight (none without
        `overlap_param_gather`)."""
        if self.deferred is not None:
            self.deferred.finish()

    def held_tensors(self) -> dict[str, list[Tensor]]:
        held = self.grads.held_tensors()
        return {
            "params": [f.flat for f in self.flats],
            "grads": held.get("grads", []),
            "comm_buffers": held.get("comm_buffers", []),
        }

    @torch.no_grad()
    def relink_moved(self) -> None:
        """A parameter whose storage was replaced after construction (`model.to()` copies,
        `p.data = ...`) no longer views the flat buffer, so the update would miss it: its
        current values go into the buffer and it views the buffer again."""
        for flat, group in zip(self.flats, self._groups):
            changed = False
            for s in flat.slots:
                view = flat.param_view(flat.flat, s)
                p = s.param
                if p.data.data_ptr() == view.data_ptr() and p.data.is_contiguous():
                    continue
                changed |= guards.relink(p, view, p.shape)
            if changed:
                group.refresh_master()


def _check_in_model(model: nn.Module, group_index: int, params: list[Tensor]) -> None:
    """`overlap_param_gather` finishes the gather in `model.state_dict()`: a parameter the
    model does not hold (another model, a copy) would be saved before its gather ends."""
    held = {id(p) for p in model.parameters()}
    for i, p in enumerate(params):
        if id(p) not in held:
            raise ValueError(
                f"overlap_param_gather: trainable parameter {i} of param group {group_index} "
                f"(shape {tuple(p.shape)}) is not a parameter of the model given as model=; "
                "pass the model these parameters belong to (the module itself, not a copy)"
            )


def _describe(flat: FlatParams) -> list[HeldParam]:
    plan = flat.plan
    return [
        HeldParam(slot.param, tuple(slot.param.shape), slot.offset, tuple(plan.pieces(sp)))
        for slot, sp in zip(flat.slots, plan.slots)
    ]

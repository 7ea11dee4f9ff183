"""Flat, padded parameter buffers and how they are split into shards.

The parameters of one (param group, dtype) are packed one after another into a single flat
buffer, and each `nn.Parameter`'s `.data` becomes a view of it, so the model keeps using its
parameters while the optimizer and the collectives see one contiguous tensor.

The buffer is cut into buckets (at most `bucket_numel` elements, a bucket boundary never cuts
a parameter). Each bucket is padded to a multiple of `num_shards * ALIGN` and split into
`num_shards` equal chunks: rank r owns chunk r of every bucket. A parameter may straddle two
ranks' chunks, so shards are balanced to within padding (torch's ZeroRedundancyOptimizer
assigns whole parameters and can be far off). A bucket is the unit of one reduce-scatter or
all-gather: its chunks are exactly what `reduce_scatter_single` / `all_gather_single` split.

With one shard (stage 0) the layout is the same, and each rank "owns" every bucket whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from zeroshard.shard.layout import ALIGN, Bucket, BucketPlan, plan_buckets

__all__ = ["ALIGN", "Bucket", "FlatParams", "Slot"]


@dataclass(frozen=True)
class Slot:
    """Where one parameter lives in its flat buffer."""

    param: nn.Parameter
    index: int  # position among the buffer's parameters
    offset: int  # first element in the flat buffer
    numel: int
    bucket: int


class FlatParams:
    """One param group's parameters of one dtype, packed, bucketed and sharded.

    Args:
        params: parameters of a single dtype and device, in the order given by the user.
        num_shards: ranks the buffer is split across (1 for replicated stage 0).
        shard: this rank's index among them.
        bucket_numel: largest bucket, in elements (DeepSpeed's `reduce_bucket_size`).
        align: a state codec's per-parameter alignment (`layout.plan_buckets`), or None.
    """

    def __init__(
        self, params: list[nn.Parameter], num_shards: int, shard: int, bucket_numel: int,
        align: Callable[[int], int] | None = None,
    ) -> None:  # fmt: skip
        if not params:
            raise ValueError("FlatParams needs at least one parameter")
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard index {shard} out of range for {num_shards} shards")
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(f"one flat buffer holds one dtype and device, got {dtypes} {devices}")
        self.dtype = params[0].dtype
        self.device = params[0].device
        self.num_shards = num_shards
        self.shard = shard
        self.plan: BucketPlan = plan_buckets(
            [p.numel() for p in params], num_shards, bucket_numel, align
        )
        self.slots = [Slot(params[s.index], s.index, s.offset, s.numel, s.bucket)
                      for s in self.plan.slots]  # fmt: skip
        self.buckets = list(self.plan.buckets)
        self.numel = self.plan.numel
        self.shard_numel = self.plan.shard_numel
        self.param_numel = self.plan.param_numel

        # Move the parameters into the flat buffer and point them at it.
        self.flat = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for s in self.slots:
                view = self.flat[s.offset : s.offset + s.numel]
                view.copy_(s.param.detach().reshape(-1))
                s.param.data = view.view_as(s.param)

    # -- views --------------------------------------------------------------------------
    def param_view(self, flat: Tensor, slot: Slot) -> Tensor:
        """The 1-D range of a full-size flat tensor (params or grads) that belongs to `slot`."""
        return flat[slot.offset : slot.offset + slot.numel]

    def own_chunks(self, flat: Tensor) -> list[Tensor]:
        """This rank's chunk of every bucket, as views of a full-size flat tensor."""
        out = []
        for b in self.buckets:
            lo, hi = b.chunk_range(self.shard)
            out.append(flat[lo:hi])
        return out

    def bucket_view(self, flat: Tensor, bucket: Bucket) -> Tensor:
        return flat[bucket.start : bucket.start + bucket.numel]

    def split_shard(self, shard: Tensor) -> list[Tensor]:
        """Split a contiguous per-rank shard tensor into its per-bucket pieces."""
        return [shard[b.shard_offset : b.shard_offset + b.chunk] for b in self.buckets]


"""`HostOffload`: a placement that keeps a shard group's fp32 master and optimizer state in
host memory (DeepSpeed's `offload_optimizer: {"device": "cpu"}`).

Per step and shard group:
1. gradients in, during backward (`GradLanding`): every time a reduction lands in a range of
   the gradient buffers, the gradient path calls `grads_landed` and the range is copied into
   the group's host fp32 staging buffer (pinned; on CUDA a `non_blocking` copy on a copy
   stream of its own that first waits for the current stream, where the landed values were
   produced), so the copies run behind the rest of backward. `stage_grads` at step time waits
   for those copies and copies synchronously only what did not land since the buffers were
   last zeroed (a unit without gradients this step, a reduction made outside the hooks).
   `grads_reset` (before the gradient path zeroes its buffers) makes the current stream wait
   for the copies still reading them and forgets what was copied, so a backward thrown away
   with `zero_grad()` never reaches the update.
2. the update runs on the host: torch's fused CPU kernels over the flat host pieces
   (`update.apply_update` picks them for CPU tensors), multi-threaded by torch's intra-op pool
   (`threads` sets its size once).
3. `write_params`: the updated master goes back to the parameters piece by piece
   (`non_blocking` from pinned memory on CUDA, on the current stream; the next `stage_grads`
   synchronises that stream before the host overwrites the master).

A range can land more than once before a step (gradient accumulation at stages 2-3, a
second backward): each landing copies the whole range again after the add into it, so the
host holds the device's final value; the copy stream runs its copies in order, so the last
one wins even where an earlier copy raced with the add.

On a machine without an accelerator the parameters are on the CPU too, and every one of these
copies still happens between buffers of their own, so tests on CPU run the whole mechanism
(the landing copies are then synchronous, inside the collective's completion).
"""

from __future__ import annotations

import torch
from torch import Tensor


class _Span:
    """One tracked gradient piece: its elements [lo, hi) in its device storage, its slice of
    the host staging buffer, and the sub-ranges copied there since the last reset."""

    __slots__ = ("lo", "hi", "host", "copied")

    def __init__(self, lo: int, hi: int, host: Tensor) -> None:
        self.lo, self.hi, self.host = lo, hi, host
        self.copied: list[tuple[int, int]] = []  # disjoint, sorted

    def mark(self, lo: int, hi: int) -> None:
        merged: list[tuple[int, int]] = []
        for a, b in sorted([*self.copied, (lo, hi)]):
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self.copied = merged

    @property
    def complete(self) -> bool:
        return self.hi == self.lo or self.copied == [(self.lo, self.hi)]


def _key(grads: list[Tensor]) -> tuple:
    """A shard group's gradient pieces are fixed views of buffers that live as long as the
    optimizer: their addresses name the group."""
    return tuple((g.device.type, g.data_ptr(), g.numel()) for g in grads)


class HostOffload:
    """Master and optimizer state in host memory; the update runs on the host.

    `overlap_grads=False` copies every gradient at step time (the behaviour before the copies
    moved into backward; benchmarks compare the two)."""

    name = "host"  # `memory_report` counts this placement's buffers as host memory

    def __init__(self, pin_memory: bool = True, threads: int | None = None,
                 overlap_grads: bool = True) -> None:  # fmt: skip
        if threads is not None and threads < 1:
            raise ValueError(f"offload threads must be >= 1, got {threads}")
        self.pin_memory = bool(pin_memory)
        self.threads = threads
        self.overlap_grads = bool(overlap_grads)
        if threads is not None:
            torch.set_num_threads(int(threads))  # the host update's intra-op pool
        self._staging: dict[tuple, Tensor] = {}
        self._spans: dict[tuple, list[_Span]] = {}  # by group key, in piece order
        self._by_storage: dict[int, list[_Span]] = {}  # by device storage address
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self.copies_in = 0  # gradient pieces copied to the host at step time
        self.copies_landed = 0  # gradient ranges copied to the host as they landed
        self.copies_out = 0  # master pieces copied back to the parameters

    def _host_zeros(self, numel: int, like: Tensor) -> Tensor:
        pin = self.pin_memory and like.is_cuda  # pinning needs a CUDA context to mean anything
        return torch.zeros(numel, dtype=torch.float32, device="cpu", pin_memory=pin)

    def shares_params(self, param_dtype: torch.dtype) -> bool:
        return False  # the master never lives in the parameters' memory

    def allocate(self, numel: int, like: Tensor) -> Tensor:
        return self._host_zeros(numel, like)

    # -- gradients in ---------------------------------------------------------------------
    def _buffer(self, grads: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        key = _key(grads)
        buf = self._staging.get(key)
        if buf is None:
            buf = self._staging[key] = self._host_zeros(sum(g.numel() for g in grads), grads[0])
        return buf, list(buf.split([g.numel() for g in grads]))

    def track_grads(self, grads: list[Tensor]) -> None:
        """Allocate the group's host buffer now, and map each piece's device range to it."""
        if not grads or _key(grads) in self._spans:
            return
        _, host = self._buffer(grads)
        spans = []
        for g, h in zip(grads, host):
            lo = g.storage_offset()
            sp = _Span(lo, lo + g.numel(), h)
            spans.append(sp)
            # Landing copies need a 1-D view, and on CUDA pinned memory: a copy into pageable
            # memory would hold the host until the device caught up. Others: step time.
            if g.dim() == 1 and g.stride(0) == 1 and (not g.is_cuda or h.is_pinned()):
                self._by_storage.setdefault(g.untyped_storage().data_ptr(), []).append(sp)
        self._spans[_key(grads)] = spans

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        s = self._streams.get(device)
        if s is None:
            s = self._streams[device] = torch.cuda.Stream(device)
        return s

    @torch.no_grad()
    def grads_landed(self, target: Tensor, value: Tensor | None = None) -> None:
        """Copy the tracked pieces inside `target` (values from `value` if given) to the host."""
        if not self.overlap_grads or target.dim() != 1 or target.stride(0) != 1:
            return
        spans = self._by_storage.get(target.untyped_storage().data_ptr())
        if not spans:
            return
        src = target if value is None else value.reshape(-1)
        base, n = target.storage_offset(), target.numel()
        jobs = []
        for sp in spans:
            lo, hi = max(sp.lo, base), min(sp.hi, base + n)
            if lo < hi:
                jobs.append((sp, lo, hi))
        if not jobs:
            return
        if src.is_cuda:
            stream = self._stream(src.device)
            # the landed values were written by work ordered on the current stream (the wait
            # on the collective, an add into the range); the copy starts after it
            stream.wait_stream(torch.cuda.current_stream(src.device))
            with torch.cuda.stream(stream):
                for sp, lo, hi in jobs:
                    piece = src[lo - base : hi - base]
                    # cast on the device (on this stream), so the transfer is a plain copy
                    sp.host[lo - sp.lo : hi - sp.lo].copy_(piece.float(), non_blocking=True)
            # `value` may be a temporary freed as soon as the caller drops it: its memory
            # must not be handed out again before this stream has read it
            src.record_stream(stream)
        else:
            for sp, lo, hi in jobs:
                sp.host[lo - sp.lo : hi - sp.lo].copy_(src[lo - base : hi - base])
        for sp, lo, hi in jobs:
            sp.mark(lo, hi)
        self.copies_landed += len(jobs)

    def grads_reset(self) -> None:
        """Before the gradient buffers are zeroed: the zeroing waits for the copies still
        reading them (device side), and every copy made so far is stale."""
        for device, stream in self._streams.items():
            torch.cuda.current_stream(device).wait_stream(stream)
        for spans in self._spans.values():
            for sp in spans:
                sp.copied = []

    def stage_grads(self, grads: list[Tensor]) -> list[Tensor]:
        """Host fp32 copies of `grads`: the ones that landed during backward, plus a copy now
        of every piece that did not land whole since the last reset."""
        if not grads:
            return []
        buf, out = self._buffer(grads)
        spans = self._spans.get(_key(grads))
        on_cuda = grads[0].is_cuda
        if on_cuda:  # the landing copies are done before the host reads, or overwrites, them
            stream = self._streams.get(grads[0].device)
            if stream is not None:
                stream.synchronize()
        for i, (dst, g) in enumerate(zip(out, grads)):
            if spans is not None and spans[i].complete:
                continue
            # cast on the device, so the transfer is a plain asynchronous copy
            dst.copy_(g.reshape(-1).float(), non_blocking=on_cuda)
            self.copies_in += 1
        if on_cuda:  # one stream: this also waits for the last copies out of the master
            torch.cuda.current_stream(grads[0].device).synchronize()
        return out

    # -- the master out -------------------------------------------------------------------
    @torch.no_grad()
    def write_params(self, master: list[Tensor], params: list[Tensor]) -> None:
        """Each parameter piece takes its master piece, rounded to the parameters' dtype."""
        for p, m in zip(params, master):
            if p.is_cuda and p.dtype != m.dtype:  # transfer fp32 asynchronously, round there
                p.view(-1).copy_(m.to(p.device, non_blocking=True))
            else:
                p.view(-1).copy_(m, non_blocking=p.is_cuda)
        self.copies_out += len(params)

    def staging_buffers(self) -> list[Tensor]:
        """The host gradient buffers (the memory report counts them as host `grads`)."""
        return list(self._staging.values())

"""`HostOffload`: a placement that keeps a shard group's fp32 master and optimizer state in
host memory (DeepSpeed's `offload_optimizer: {"device": "cpu"}`).

Per step and shard group (`ShardGroup.update`):
1. `stage_grads`: the reduced gradient pieces are copied into a host fp32 buffer of the group
   (pinned, `non_blocking` when they are on CUDA; one wait for the group's copies before the
   host reads them). The copy runs per shard group at step time, after the reduction has
   finished: a first version, not yet overlapped with backward.
2. the update runs on the host: torch's fused CPU kernels over the flat host pieces
   (`update.apply_update` picks them for CPU tensors), multi-threaded by torch's intra-op pool
   (`threads` sets its size once).
3. `write_params`: the updated master goes back to the parameters piece by piece
   (`non_blocking` from pinned memory on CUDA; the next `stage_grads` waits for those copies
   before the host overwrites the master). Everything runs on the current stream: the copies
   do not yet overlap compute or each other.

On a machine without an accelerator the parameters are on the CPU too, and every one of these
copies still happens between buffers of their own, so tests on CPU run the whole mechanism.
"""

from __future__ import annotations

import torch
from torch import Tensor


class HostOffload:
    """Master and optimizer state in host memory; the update runs on the host."""

    name = "host"  # `memory_report` counts this placement's buffers as host memory

    def __init__(self, pin_memory: bool = True, threads: int | None = None) -> None:
        if threads is not None and threads < 1:
            raise ValueError(f"offload threads must be >= 1, got {threads}")
        self.pin_memory = bool(pin_memory)
        self.threads = threads
        if threads is not None:
            torch.set_num_threads(int(threads))  # the host update's intra-op pool
        self._staging: dict[tuple, Tensor] = {}
        self.copies_in = 0  # gradient pieces copied to the host (counted: tests check them)
        self.copies_out = 0  # master pieces copied back to the parameters

    def _host_zeros(self, numel: int, like: Tensor) -> Tensor:
        pin = self.pin_memory and like.is_cuda  # pinning needs a CUDA context to mean anything
        return torch.zeros(numel, dtype=torch.float32, device="cpu", pin_memory=pin)

    def shares_params(self, param_dtype: torch.dtype) -> bool:
        return False  # the master never lives in the parameters' memory

    def allocate(self, numel: int, like: Tensor) -> Tensor:
        return self._host_zeros(numel, like)

    def stage_grads(self, grads: list[Tensor]) -> list[Tensor]:
        """Copies of `grads` in host fp32 memory. Every stage's gradient pieces are fixed views
        of buffers that live as long as the optimizer, so their addresses name the group and
        its host buffer is allocated once."""
        if not grads:
            return []
        key = tuple((g.device.type, g.data_ptr(), g.numel()) for g in grads)
        buf = self._staging.get(key)
        if buf is None:
            buf = self._staging[key] = self._host_zeros(sum(g.numel() for g in grads), grads[0])
        out = list(buf.split([g.numel() for g in grads]))
        on_cuda = grads[0].is_cuda
        for dst, g in zip(out, grads):
            # cast on the device, so the transfer is a plain asynchronous copy
            dst.copy_(g.reshape(-1).float(), non_blocking=on_cuda)
        if on_cuda:  # one stream: this also waits for the last copies out of the master
            torch.cuda.current_stream(grads[0].device).synchronize()
        self.copies_in += len(grads)
        return out

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

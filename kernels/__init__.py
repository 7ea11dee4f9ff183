"""Fused Triton optimizer-update kernels (installed as `zeroshard_kernels`).

One kernel per file with its launch wrapper. Each updates a flat fp32 master shard in one pass,
folding in the gradient scale, the device-side inf/nan skip and the low-precision model copy.
`zeroshard.update.apply` dispatches to these on CUDA tensors (or on CPU under TRITON_INTERPRET=1).
`quant_blockwise` holds the blockwise int8/int4 wire codec (ZeRO++): quantize, dequantize,
dequantize_sum, requantize_sum, each with a torch path for other devices.
"""

from ._common import INTERPRET, INTERPRET_BLOCK
from .adam import adam_kernel, adam_update
from .adamw8bit import adamw8bit_kernel, adamw8bit_update
from .grad_stats import grad_stats, grad_stats_kernel
from .lion import lion_kernel, lion_update
from .quant_blockwise import dequantize_kernel, dequantize_sum_kernel, quantize_kernel
from .sgd import sgd_kernel, sgd_update

__all__ = [
    "INTERPRET",
    "INTERPRET_BLOCK",
    "adam_kernel",
    "adam_update",
    "adamw8bit_kernel",
    "adamw8bit_update",
    "grad_stats",
    "grad_stats_kernel",
    "lion_kernel",
    "lion_update",
    "quantize_kernel",
    "dequantize_kernel",
    "dequantize_sum_kernel",
    "sgd_kernel",
    "sgd_update",
]

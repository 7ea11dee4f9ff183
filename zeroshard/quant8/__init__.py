"""Blockwise 8-bit AdamW states: the format, its quantizer and the fused step.

Format (docs/adamw8bit.md): each state is one uint8 code per element plus one fp32 absmax per
block of `block_size` contiguous elements; element i of a block holds
`qmap[code[i]] * absmax`. `exp_avg` uses the signed dynamic map, `exp_avg_sq` the unsigned one
(both built as bitsandbytes' `create_dynamic_map` builds them). Blocks start at multiples of
`block_size` in a parameter's global element index, so they never depend on the world size; a
parameter's last block may be short.

Rounding (identical on every backend, defined by value, not by algorithm):
    x    = s / absmax       (IEEE fp32 division; absmax 0 -> divide by 1, all s are 0 then)
    code = #{k : mid[k] < x}  with mid[k] = fp32((qmap[k] + qmap[k+1]) * 0.5), k < 255
i.e. the nearest map value, a tie on a midpoint going to the lower code. The Triton kernel finds
the count by binary search over `mid`; the CPU path by a 2^17-entry table indexed by the top 17
bits of x (each bucket holds at most one midpoint, so one comparison finishes the count).

The step (`adamw8bit_step_`): every operation in fp32, each rounded once, in this order:
    g = fp32(grad) [* grad_scale];  m = qmap_s[mc] * ma;  v = qmap_u[vc] * va
    p = p * decay                                      (decay = 1 - lr * weight_decay)
    m = m * beta1 + g * (1 - beta1);  v = v * beta2 + (g * g) * (1 - beta2)
    p = p - (m / (sqrt(v) / bc2_sqrt + eps)) * step_size   (step_size = lr / (1 - beta1^step))
then m, v are requantized with new absmax = max |.| per block. The parameter sees the fp32
m and v of this step (as bitsandbytes does); scalars are fp64 on the host, rounded to fp32 once
(`hyper_params`). No fused multiply-add anywhere: the Triton kernel is compiled without fp
fusion. sqrt is the correctly rounded one (on CPU numpy's, or fp64's: torch's fp32 one is not).
"""

from zeroshard.quant8.format import (
    BLOCK_SIZE,
    MIN_8BIT_SIZE,
    STATE_NAMES,
    block_slice,
    dequantize_blockwise,
    dequantize_span,
    dynamic_map,
    init_state8,
    kernel_tables,
    midpoints,
    num_blocks,
    quantize_blockwise,
    state_bytes,
    uses_8bit,
    zero_code,
)
from zeroshard.quant8.step import adamw8bit_step_, hyper_params

__all__ = [
    "BLOCK_SIZE",
    "MIN_8BIT_SIZE",
    "STATE_NAMES",
    "adamw8bit_step_",
    "block_slice",
    "dequantize_blockwise",
    "dequantize_span",
    "dynamic_map",
    "hyper_params",
    "init_state8",
    "kernel_tables",
    "midpoints",
    "num_blocks",
    "quantize_blockwise",
    "state_bytes",
    "uses_8bit",
    "zero_code",
]

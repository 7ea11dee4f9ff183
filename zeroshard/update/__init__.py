"""The update rules, one fused pass over a flat shard.

- apply.py: `apply_update` (AdamW, Adam, SGD, Lion; Triton on CUDA, torch's fused kernels on
  CPU), `init_state`, `grad_stats`;
- rules.py: rule names, torch.optim's hyperparameters and defaults, `resolve_rule`;
- lion.py: the CPU Lion path; buffers.py: per-device scalar buffers the kernels read.
"""

"""`deepspeed.initialize` on zeroshard: run an existing DeepSpeed script by changing its import
(`import zeroshard.integrations.deepspeed as deepspeed`).

The engine keeps DeepSpeed's training-loop contract: `engine(x)`, `engine.backward(loss)`
(fp16 loss scaling and 1/gradient_accumulation_steps), `engine.step()` (applies only at an
accumulation boundary, then clears gradients and steps the scheduler), and
`save_checkpoint` / `load_checkpoint` with DeepSpeed's signatures, writing zeroshard's
checkpoint format (every rank's shard, full weights, client state).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import zeroshard
from zeroshard.integrations.hf_config import read_config

log = logging.getLogger(__name__)
_ENGINE_KEY = "zeroshard_engine"


def init_distributed(dist_backend: str | None = None, **kwargs: Any) -> None:
    """`deepspeed.init_distributed`: the default process group from torchrun's environment."""
    if dist.is_initialized():
        return
    backend = dist_backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)


class ZeroShardEngine(nn.Module):
    """What `deepspeed.initialize` returns first: the model plus the training-loop methods."""

    def __init__(self, module: nn.Module, optimizer: Any, config: Mapping[str, Any],
                 client_scheduler: Any = None) -> None:  # fmt: skip
        super().__init__()
        self.module = module
        self._optimizer = optimizer
        self._config = dict(config)
        self.client_lr_scheduler = client_scheduler
        self.global_steps = 0
        self.global_samples = 0
        self.micro_steps = 0
        self._step_applied = False
        cfg = optimizer.config
        self._micro = int(cfg.train_micro_batch_size_per_gpu or 1)
        self._gas = int(cfg.gradient_accumulation_steps or 1)
        self._stage = int(cfg.zero_optimization.stage)
        self._precision = cfg.precision

    # -- DeepSpeed's attributes ------------------------------------------------------------
    @property
    def optimizer(self) -> Any:
        return self._optimizer

    @property
    def lr_scheduler(self) -> Any:
        return self.client_lr_scheduler or self._optimizer.lr_scheduler

    @property
    def global_rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else 1

    @property
    def local_rank(self) -> int:
        return int(os.environ.get("LOCAL_RANK", 0))

    @property
    def device(self) -> torch.device:
        return next(iter(self.module.buffers()), next(self.module.parameters())).device

    def train_micro_batch_size_per_gpu(self) -> int:
        return self._micro

    def gradient_accumulation_steps(self) -> int:
        return self._gas

    def train_batch_size(self) -> int:
        return self._micro * self._gas * self.world_size

    def zero_optimization_stage(self) -> int:
        return self._stage

    def bfloat16_enabled(self) -> bool:
        return self._precision == "bf16"

    def fp16_enabled(self) -> bool:
        return self._precision == "fp16"

    def get_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self._optimizer.param_groups]

    def get_global_grad_norm(self) -> float | None:
        """The unclipped global gradient norm of the last applied step."""
        return getattr(self._optimizer, "last_grad_norm", None)

    def was_step_applied(self) -> bool:
        return self._step_applied

    def is_gradient_accumulation_boundary(self) -> bool:
        """True when the next `step()` applies the update (DeepSpeed's definition)."""
        return (self.micro_steps + 1) % self._gas == 0

    # -- the training loop -----------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor, retain_graph: bool = False,
                 scale_wrt_gas: bool = True) -> torch.Tensor:  # fmt: skip
        """Backward of `loss` times the fp16 loss scale, divided by the accumulation steps."""
        if scale_wrt_gas:
            self._optimizer.backward(loss, retain_graph=retain_graph)
        else:
            (loss * self._optimizer.loss_scale).backward(retain_graph=retain_graph)
        return loss

    def step(self, lr_kwargs: dict | None = None) -> None:
        """Count a micro-step; at an accumulation boundary apply the update (clipping by
        `gradient_clipping`), clear the gradients and step the scheduler."""
        self._step_applied = False
        if self.is_gradient_accumulation_boundary():
            skipped = self._optimizer.skipped_steps
            self._optimizer.step()
            self._optimizer.zero_grad()
            self._step_applied = self._optimizer.skipped_steps == skipped
            if self.client_lr_scheduler is not None and self._step_applied:
                self.client_lr_scheduler.step(**(lr_kwargs or {}))
            self.global_steps += 1
            self.global_samples += self.train_batch_size()
        self.micro_steps += 1

    def zero_grad(self) -> None:
        self._optimizer.zero_grad()

    # -- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, save_dir: str | os.PathLike, tag: Any = None,
                        client_state: dict | None = None, save_latest: bool = True,
                        exclude_frozen_parameters: bool = False) -> bool:  # fmt: skip
        """Every rank: its shard, plus the weights and `client_state`; tag `global_stepN`."""
        tag = str(tag) if tag is not None else f"global_step{self.global_steps}"
        state = dict(client_state or {})
        state[_ENGINE_KEY] = {
            "global_steps": self.global_steps, "global_samples": self.global_samples,
            "micro_steps": self.micro_steps,
            "client_lr_scheduler": (self.client_lr_scheduler.state_dict()
                                    if self.client_lr_scheduler is not None else None),
        }  # fmt: skip
        zeroshard.save_checkpoint(save_dir, self.module, self._optimizer, tag=tag,
                                  client_state=state)  # fmt: skip
        return True

    def load_checkpoint(self, load_dir: str | os.PathLike, tag: Any = None,
                        load_module_strict: bool = True, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False,
                        ) -> tuple[str | None, dict | None]:  # fmt: skip
        """Returns `(checkpoint path, client_state)`, or `(None, None)` when `load_dir` has
        no checkpoint (as DeepSpeed does)."""
        if tag is None and not os.path.isfile(os.path.join(load_dir, "latest")):
            log.warning("no 'latest' file in %s: nothing loaded", load_dir)
            return None, None
        with_opt = load_optimizer_states and not load_module_only
        path, state = zeroshard.load_checkpoint(
            load_dir, self.module, self._optimizer if with_opt else None,
            tag=None if tag is None else str(tag),
        )  # fmt: skip
        state = dict(state)
        mine = state.pop(_ENGINE_KEY, None) or {}
        if not load_module_only:
            self.global_steps = int(mine.get("global_steps", 0))
            self.global_samples = int(mine.get("global_samples", 0))
            self.micro_steps = int(mine.get("micro_steps", 0))
            sched = mine.get("client_lr_scheduler")
            if load_lr_scheduler_states and sched and self.client_lr_scheduler is not None:
                self.client_lr_scheduler.load_state_dict(sched)
        return str(path), state


def _loader(data: Dataset, engine: ZeroShardEngine, collate_fn: Callable | None) -> DataLoader:
    """DeepSpeed's `deepspeed_io`: a DistributedSampler over the data-parallel ranks."""
    sampler = DistributedSampler(data, num_replicas=engine.world_size, rank=engine.global_rank)
    return DataLoader(data, batch_size=engine.train_micro_batch_size_per_gpu(),
                      sampler=sampler, collate_fn=collate_fn)  # fmt: skip


def initialize(
    args: Any = None,
    model: nn.Module | None = None,
    optimizer: Any = None,
    model_parameters: Iterable[Any] | None = None,
    training_data: Dataset | None = None,
    lr_scheduler: Any = None,
    mpu: Any = None,
    dist_init_required: bool | None = None,
    collate_fn: Callable | None = None,
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    config_params: Mapping[str, Any] | None = None,
) -> tuple[ZeroShardEngine, Any, DataLoader | None, Any]:
    """Returns `(engine, optimizer, training_dataloader, lr_scheduler)` as DeepSpeed does."""
    if model is None:
        raise ValueError("initialize: model is required")
    if mpu is not None:
        raise ValueError("initialize: mpu (model parallelism) is not supported by zeroshard")
    if optimizer is not None:
        raise ValueError(
            "initialize: a client optimizer is not supported; describe it in the config's "
            '"optimizer" section (zeroshard builds the sharded optimizer from it)'
        )
    config = config if config is not None else config_params
    if config is None and args is not None:
        config = getattr(args, "deepspeed_config", None)
    if config is None:
        raise ValueError("initialize: give config= (a dict or a JSON path)")
    cfg = read_config(config)
    init_distributed()
    module, opt = zeroshard.initialize(model, cfg, model_parameters=model_parameters)
    client = None
    if lr_scheduler is not None:
        if opt.lr_scheduler is not None:
            raise ValueError("initialize: lr_scheduler given and the config has a scheduler too")
        client = lr_scheduler(opt) if callable(lr_scheduler) and not hasattr(
            lr_scheduler, "step") else lr_scheduler  # fmt: skip
    engine = ZeroShardEngine(module, opt, cfg, client)
    loader = _loader(training_data, engine, collate_fn) if training_data is not None else None
    return engine, opt, loader, engine.lr_scheduler

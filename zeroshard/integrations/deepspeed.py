"""`deepspeed.initialize` on zeroshard: run an existing DeepSpeed script by changing its import
(`import zeroshard.integrations.deepspeed as deepspeed`).

The engine keeps DeepSpeed's training-loop contract: `engine(x)`, `engine.backward(loss)`
(fp16 loss scaling and 1/gradient_accumulation_steps), `engine.step()` (applies only at an
accumulation boundary, then clears gradients and steps the scheduler), and
`save_checkpoint` / `load_checkpoint` with DeepSpeed's signatures, writing zeroshard's
checkpoint format (every rank's shard, full weights, client state).

Also here, as typical DeepSpeed scripts call them: `add_config_arguments`, `init_distributed`,
`comm` (ranks and the common collectives), `zero.Init`, `zero.GatheredParameters`, and the
engine's `save_16bit_model`. Anything else raises an AttributeError naming it.
"""

from __future__ import annotations

import argparse
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
from zeroshard.stage3.state_dict import full_state_dict

log = logging.getLogger(__name__)
_ENGINE_KEY = "zeroshard_engine"


def init_distributed(dist_backend: str | None = None, auto_mpi_discovery: bool = True,
                     distributed_port: int | None = None, verbose: bool = True,
                     timeout: Any = None, init_method: str | None = None,
                     dist_init_required: bool | None = None, config: Any = None,
                     rank: int = -1, world_size: int = -1) -> None:  # fmt: skip
    """`deepspeed.init_distributed`: the default process group from torchrun's environment
    (or `init_method`, `rank`, `world_size`, `timeout` when given)."""
    if dist.is_initialized() or dist_init_required is False:
        return
    if init_method is None and world_size < 0 and "WORLD_SIZE" not in os.environ:
        return  # a plain single process: zeroshard needs no process group
    backend = dist_backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if distributed_port is not None:
        os.environ.setdefault("MASTER_PORT", str(distributed_port))
    extra: dict[str, Any] = {"init_method": init_method}
    if timeout is not None:
        extra["timeout"] = timeout
    if rank >= 0 and world_size > 0:
        extra.update(rank=rank, world_size=world_size)
    dist.init_process_group(backend, **extra)


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`deepspeed.add_config_arguments`: `--deepspeed` and `--deepspeed_config PATH`."""
    group = parser.add_argument_group("DeepSpeed", "DeepSpeed configurations")
    group.add_argument("--deepspeed", default=False, action="store_true",
                       help="enable DeepSpeed (here: zeroshard)")  # fmt: skip
    group.add_argument("--deepspeed_config", default=None, type=str,
                       help="DeepSpeed json configuration file")  # fmt: skip
    return parser


class _Namespace:
    """A DeepSpeed sub-namespace: whatever the shim lacks is an error naming it."""

    _name = ""

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"deepspeed.{self._name}.{name} is not supported by zeroshard's DeepSpeed shim "
            "(zeroshard.integrations.deepspeed)"
        )


def _on() -> bool:
    return dist.is_available() and dist.is_initialized()


class _Comm(_Namespace):
    """`deepspeed.comm`: torch.distributed's calls under DeepSpeed's names and defaults."""

    _name = "comm"
    ReduceOp = dist.ReduceOp

    init_distributed = staticmethod(init_distributed)

    @staticmethod
    def is_initialized() -> bool:
        return _on()

    @staticmethod
    def get_rank(group: Any = None) -> int:
        return dist.get_rank(group) if _on() else 0

    @staticmethod
    def get_world_size(group: Any = None) -> int:
        return dist.get_world_size(group) if _on() else 1

    @staticmethod
    def get_local_rank() -> int:
        return int(os.environ.get("LOCAL_RANK", 0))

    @staticmethod
    def barrier(group: Any = None, async_op: bool = False) -> Any:
        return dist.barrier(group=group, async_op=async_op) if _on() else None

    @staticmethod
    def all_reduce(tensor: torch.Tensor, op: Any = dist.ReduceOp.SUM, group: Any = None,
                   async_op: bool = False) -> Any:  # fmt: skip
        return dist.all_reduce(tensor, op=op, group=group, async_op=async_op) if _on() else None

    @staticmethod
    def broadcast(tensor: torch.Tensor, src: int, group: Any = None,
                  async_op: bool = False) -> Any:  # fmt: skip
        return dist.broadcast(tensor, src, group=group, async_op=async_op) if _on() else None

    @staticmethod
    def all_gather(tensor_list: list[torch.Tensor], tensor: torch.Tensor, group: Any = None,
                   async_op: bool = False) -> Any:  # fmt: skip
        if _on():
            return dist.all_gather(tensor_list, tensor, group=group, async_op=async_op)
        tensor_list[0].copy_(tensor)
        return None


class _Zero(_Namespace):
    """`deepspeed.zero`: `Init` (partition parameters at construction) and
    `GatheredParameters`, on zeroshard's own."""

    _name = "zero"

    @staticmethod
    def Init(module: nn.Module | None = None, data_parallel_group: Any = None,  # noqa: N802
             mem_efficient_linear: bool = True, remote_device: str | None = None,
             pin_memory: bool = False, config_dict_or_path: Any = None, config: Any = None,
             enabled: bool = True, dtype: torch.dtype | None = None, mpu: Any = None,
             **unsupported: Any) -> zeroshard.Init:  # fmt: skip
        """`deepspeed.zero.Init(config_dict_or_path=..., enabled=...)`."""
        for name, bad in (("module", module is not None), ("mpu", mpu is not None),
                          ("remote_device", remote_device not in (None, "none")),
                          *((k, True) for k in unsupported)):  # fmt: skip
            if bad:
                raise ValueError(f"deepspeed.zero.Init({name}=...) is not supported by "
                                 "zeroshard's DeepSpeed shim")  # fmt: skip
        cfg = config_dict_or_path if config_dict_or_path is not None else config
        init = zeroshard.Init(read_config(cfg) if cfg is not None else None,
                              process_group=data_parallel_group, enabled=enabled)  # fmt: skip
        if enabled and dtype is not None and init.dtype not in (None, dtype):
            raise ValueError(f"deepspeed.zero.Init(dtype={dtype}) contradicts the config's "
                             f"precision ({init.dtype}); drop dtype or change the config")
        return init

    @staticmethod
    def GatheredParameters(params: Any, modifier_rank: int | None = None,  # noqa: N802
                           fwd_module: Any = None,
                           enabled: bool = True) -> zeroshard.GatheredParameters:  # fmt: skip
        """`deepspeed.zero.GatheredParameters`: full parameters inside the block."""
        return zeroshard.GatheredParameters(params, modifier_rank=modifier_rank,
                                            enabled=enabled)  # fmt: skip


comm = _Comm()
zero = _Zero()


def __getattr__(name: str) -> Any:
    raise AttributeError(
        f"deepspeed.{name} is not supported by zeroshard's DeepSpeed shim "
        "(zeroshard.integrations.deepspeed)"
    )


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
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # submodules, parameters, buffers
        except AttributeError:
            pass
        module = self._modules.get("module")
        if module is not None and hasattr(module, name):  # as DeepSpeed's engine forwards
            return getattr(module, name)
        raise AttributeError(f"engine.{name} is not supported by zeroshard's DeepSpeed shim "
                             "(zeroshard.integrations.deepspeed)")  # fmt: skip

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
    def save_16bit_model(self, save_dir: str | os.PathLike,
                         save_filename: str = "pytorch_model.bin",
                         exclude_frozen_parameters: bool = False) -> bool:  # fmt: skip
        """Every rank (stage 3 gathers collectively); rank 0 writes the model's weights in
        their training dtype: `torch.save` for `.bin` (as DeepSpeed), safetensors for
        `.safetensors`. A tied weight is written once."""
        state = full_state_dict(self.module, rank0_only=True)
        if self.global_rank != 0:
            return True
        if exclude_frozen_parameters:
            frozen = {n for n, p in self.module.named_parameters() if not p.requires_grad}
            state = {k: v for k, v in state.items() if k not in frozen}
        os.makedirs(save_dir, exist_ok=True)
        path = os.path.join(save_dir, save_filename)
        if save_filename.endswith(".safetensors"):
            from safetensors.torch import save_file

            seen: dict[int, str] = {}
            unique = {}
            for k, v in state.items():
                if v.data_ptr() not in seen:
                    seen[v.data_ptr()] = k
                    unique[k] = v.contiguous()
            save_file(unique, path)
        else:
            torch.save(state, path)
        return True

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
    from_args = getattr(args, "deepspeed_config", None) if args is not None else None
    if config is not None and from_args is not None:
        raise ValueError(  # DeepSpeed refuses this too: which one would win is a guess
            "initialize: a config was given both as config= and as args.deepspeed_config "
            f"({from_args}); give one of them"
        )
    config = config if config is not None else from_args
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

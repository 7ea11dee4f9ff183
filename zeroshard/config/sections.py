"""Section models of the zeroshard config (optimizer, scheduler, precision, ZeRO).

Split from :mod:`zeroshard.config.schema` (which holds the top-level model and loading) to keep each
file readable; import these names from :mod:`zeroshard.config.schema`.
"""

# pydantic evaluates field annotations at runtime, and `X | Y` fails there on Python 3.9
# (still supported by setup.py), so the models keep Optional/Union.
# ruff: noqa: UP007, UP045

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, Optional, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from zeroshard.config import honoured, zeropp
from zeroshard.config.zeropp import ZeroPPConfig

Auto = Literal["auto"]
_AUTO_HELP = (
    'is "auto", which only a Trainer fills (ZeroShardTrainer and the Hugging Face Trainer fill '
    'it from their arguments; `zeroshard check-config --hf` lists them); outside one, {give}'
)
_NO_AUTO = '"auto" has no meaning for this key; {give}'
# field names a Trainer fills when "auto" (confighonoured.TRAINER_AUTOS, by leaf name)
_TRAINER_FILLED = frozenset(k.rsplit(".", 1)[-1] for k in honoured.TRAINER_AUTOS)


def _give(annotation: Any) -> str:
    """What a value of this field type looks like, in the words of an error message."""
    if _accepts_bool(annotation):
        return "give true or false"
    if get_origin(annotation) in (tuple, list) or any(
        get_origin(a) in (tuple, list) for a in get_args(annotation)
    ):
        return "give a list of numbers"
    return "give a number"


# Sane ranges: a size beyond these is a typo (an exponent too many), not a setting.
MAX_ELEMENTS = 10**12  # bucket sizes, thresholds, live/reuse limits (elements: 4 TB of fp32)
MAX_BATCH = 2**31 - 1  # batch sizes and accumulation steps


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are re-validated,
    floats must be finite (JSON's Infinity/NaN are rejected)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # Field names that may legitimately hold "auto" (resolved later by zeroshard).
    _auto_ok: ClassVar[frozenset[str]] = frozenset()
    # Integer fields (name -> largest value) that accept a float-written whole number
    # (`5e8`), as DeepSpeed's docs write sizes; other integer fields reject floats
    # (`"stage": 2.0`).
    _float_ints: ClassVar[dict[str, int]] = {}

    @field_validator("*", mode="before")
    @classmethod
    def _reject_auto_and_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode would read `true` as 1 for a number and silently accept it;
        # "auto" only has meaning where zeroshard can resolve it.
        name = info.field_name or ""
        field = cls.model_fields.get(name)
        if isinstance(value, str) and value == "auto" and name not in cls._auto_ok:
            text = _AUTO_HELP if name in _TRAINER_FILLED else _NO_AUTO
            raise ValueError(text.format(give=_give(field.annotation if field else None)))
        if isinstance(value, bool) and field is not None and not _accepts_bool(field.annotation):
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                # `"fp16": true`: a section, not a switch (DeepSpeed accepts both)
                flag = "true" if value else "false"
                raise ValueError(f'must be an object like {{"enabled": {flag}}}, not a boolean')
            what = _give(field.annotation).removeprefix("give ")
            raise ValueError(f"must be {what}, not a boolean")
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        limit = cls._float_ints.get(name)
        if limit is not None and number and value > limit:
            raise ValueError(f"must be at most {limit} ({limit:.3g})")
        if isinstance(value, float) and field is not None and _int_only(field.annotation):
            whole = math.isfinite(value) and value.is_integer()
            if limit is not None:
                if not whole:
                    auto = ", or must be 'auto'" if name in cls._auto_ok else ""
                    raise ValueError(f"must be a whole number, got a fractional part{auto}")
                return int(value)
            hint = f" (write {int(value)})" if whole else ""
            raise ValueError(f"must be an integer, not the float {value!r}{hint}")
        return value


def _leaves(annotation: Any) -> set[type]:
    """The value types a field annotation admits (through Annotated, Union, Literal)."""
    if isinstance(annotation, type):
        return {annotation}
    if get_origin(annotation) is Literal:
        return {type(a) for a in get_args(annotation)}
    return set().union(*(_leaves(a) for a in get_args(annotation)))


def _int_only(annotation: Any) -> bool:
    """Whether a field holds integers and no floats (Literal[0, 1, 2, 3] included)."""
    leaves = _leaves(annotation)
    return int in leaves and float not in leaves


def _accepts_bool(annotation: Any) -> bool:
    """Whether a field type admits JSON true/false (bool, Optional[bool], Literal[True])."""
    if annotation is bool:
        return True
    if get_origin(annotation) is Literal:
        return any(isinstance(a, bool) for a in get_args(annotation))
    return any(_accepts_bool(a) for a in get_args(annotation))


Probability = Annotated[float, Field(ge=0.0, lt=1.0)]
Betas = tuple[Probability, Probability]
LR = Annotated[float, Field(ge=0.0)]


# --------------------------------------------------------------------------- optimizer


class AdamWParams(Section):
    """torch.optim.AdamW hyperparameters (DeepSpeed's FusedAdam keys)."""

    lr: LR = 1e-3
    betas: Betas = (0.9, 0.999)
    eps: Annotated[float, Field(gt=0.0)] = 1e-8
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.01
    amsgrad: bool = False
    # DeepSpeed keys: under AdamW decay is always decoupled; `torch_adam` picks torch's kernel.
    adam_w_mode: Literal[True] = True
    torch_adam: bool = False


class AdamParams(AdamWParams):
    """DeepSpeed "Adam": decoupled decay (= AdamW) unless adam_w_mode is false, as in DeepSpeed."""

    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    adam_w_mode: bool = True  # type: ignore[assignment]


class SGDParams(Section):
    """torch.optim.SGD hyperparameters; lr is required as it has no sensible default."""

    lr: LR
    momentum: Annotated[float, Field(ge=0.0)] = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> SGDParams:
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError(
                "`optimizer.params.nesterov` = true requires `optimizer.params.momentum` > 0 "
                f"and `optimizer.params.dampening` == 0 (got momentum={self.momentum}, "
                f"dampening={self.dampening})"
            )
        return self


class LionParams(Section):
    """Lion hyperparameters (defaults from the Lion paper)."""

    lr: LR = 1e-4
    betas: Betas = (0.9, 0.99)
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0


class AdamW8bitParams(Section):
    """AdamW with blockwise 8-bit states (docs/adamw8bit.md): AdamW's hyperparameters plus
    the block size and the global element count below which a parameter keeps fp32 states."""

    lr: LR = 1e-3
    betas: Betas = (0.9, 0.999)
    eps: Annotated[float, Field(gt=0.0)] = 1e-8
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.01
    block_size: Annotated[int, Field(ge=16, le=4096)] = 256
    min_8bit_size: Annotated[int, Field(ge=1)] = 4096

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"block_size must be a power of two, got {value}")
        return value


class _OptimizerBase(Section):
    @field_validator("type", mode="before", check_fields=False)
    @classmethod
    def _canonical_type(cls, value: Any) -> Any:
        return _OPTIMIZER_NAMES.get(value.lower(), value) if isinstance(value, str) else value


class AdamWOptimizer(_OptimizerBase):
    type: Literal["AdamW"]
    params: AdamWParams = Field(default_factory=AdamWParams)


class AdamOptimizer(_OptimizerBase):
    type: Literal["Adam"]
    params: AdamParams = Field(default_factory=AdamParams)


class SGDOptimizer(_OptimizerBase):
    type: Literal["SGD"]
    params: SGDParams


class LionOptimizer(_OptimizerBase):
    type: Literal["Lion"]
    params: LionParams = Field(default_factory=LionParams)


class AdamW8bitOptimizer(_OptimizerBase):
    type: Literal["AdamW8bit"]
    params: AdamW8bitParams = Field(default_factory=AdamW8bitParams)


OPTIMIZERS: dict[str, type[_OptimizerBase]] = {
    "AdamW": AdamWOptimizer,
    "Adam": AdamOptimizer,
    "SGD": SGDOptimizer,
    "Lion": LionOptimizer,
    "AdamW8bit": AdamW8bitOptimizer,
}
_OPTIMIZER_NAMES = {name.lower(): name for name in OPTIMIZERS}


def _tag(value: Any, names: Mapping[str, str]) -> str | None:
    """Case-insensitive discriminator: the canonical type name, or None if unknown."""
    raw = value.get("type") if isinstance(value, Mapping) else getattr(value, "type", None)
    return names.get(raw.lower()) if isinstance(raw, str) else None


OptimizerConfig = Annotated[
    Union[tuple(Annotated[m, Tag(n)] for n, m in OPTIMIZERS.items())],  # type: ignore[misc]
    Discriminator(
        lambda v: _tag(v, _OPTIMIZER_NAMES),
        custom_error_type="optimizer_type",
        custom_error_message=(
            "must be one of AdamW, Adam, SGD, Lion, AdamW8bit (case-insensitive); "
            "other DeepSpeed optimizers (Lamb, OneBitAdam, ...) are not supported by zeroshard yet"
        ),
    ),
]


# --------------------------------------------------------------------------- scheduler


class WarmupLRParams(Section):
    """DeepSpeed WarmupLR. warmup_max_lr null means "the optimizer's lr", as in DeepSpeed."""

    warmup_min_lr: LR = 0.0
    warmup_max_lr: Optional[LR] = None
    warmup_num_steps: Annotated[int, Field(ge=1)] = 1000
    warmup_type: Literal["log", "linear"] = "log"


class WarmupDecayLRParams(WarmupLRParams):
    """DeepSpeed WarmupDecayLR: warmup, then linear decay back to warmup_min_lr."""

    warmup_max_lr: Optional[LR] = 0.001
    total_num_steps: Annotated[int, Field(ge=1)]

    @model_validator(mode="after")
    def _decay_after_warmup(self) -> WarmupDecayLRParams:
        if self.total_num_steps <= self.warmup_num_steps:
            raise ValueError(
                f"`scheduler.params.total_num_steps` ({self.total_num_steps}) must be greater "
                f"than `scheduler.params.warmup_num_steps` ({self.warmup_num_steps})"
            )
        return self


class WarmupCosineLRParams(Section):
    """DeepSpeed WarmupCosineLR: ratios of the optimizer's lr, cosine decay after warmup."""

    total_num_steps: Annotated[int, Field(ge=1)]
    warmup_min_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    warmup_num_steps: Annotated[int, Field(ge=1)] = 1000
    cos_min_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0001
    warmup_type: Literal["log", "linear"] = "log"


class _SchedulerBase(Section):
    @field_validator("type", mode="before", check_fields=False)
    @classmethod
    def _canonical_type(cls, value: Any) -> Any:
        return _SCHEDULER_NAMES.get(value.lower(), value) if isinstance(value, str) else value


class WarmupLRConfig(_SchedulerBase):
    type: Literal["WarmupLR"]
    params: WarmupLRParams = Field(default_factory=WarmupLRParams)


class WarmupDecayLRConfig(_SchedulerBase):
    type: Literal["WarmupDecayLR"]
    params: WarmupDecayLRParams


class WarmupCosineLRConfig(_SchedulerBase):
    type: Literal["WarmupCosineLR"]
    params: WarmupCosineLRParams


SCHEDULERS: dict[str, type[_SchedulerBase]] = {
    "WarmupLR": WarmupLRConfig,
    "WarmupDecayLR": WarmupDecayLRConfig,
    "WarmupCosineLR": WarmupCosineLRConfig,
}
_SCHEDULER_NAMES = {name.lower(): name for name in SCHEDULERS}

SchedulerConfig = Annotated[
    Union[tuple(Annotated[m, Tag(n)] for n, m in SCHEDULERS.items())],  # type: ignore[misc]
    Discriminator(
        lambda v: _tag(v, _SCHEDULER_NAMES),
        custom_error_type="scheduler_type",
        custom_error_message=(
            "must be one of WarmupLR, WarmupDecayLR, WarmupCosineLR; "
            "DeepSpeed's LRRangeTest and OneCycle are not supported by zeroshard yet"
        ),
    ),
]


# --------------------------------------------------------------------------- precision, ZeRO


class FP16Config(Section):
    """DeepSpeed fp16 mixed precision with (dynamic) loss scaling."""

    enabled: bool = False
    loss_scale: Annotated[float, Field(ge=0.0)] = 0.0  # 0 = dynamic loss scaling
    initial_scale_power: Annotated[int, Field(ge=0, le=64)] = 16
    loss_scale_window: Annotated[int, Field(ge=1)] = 1000
    hysteresis: Annotated[int, Field(ge=1)] = 2
    consecutive_hysteresis: bool = False
    min_loss_scale: Annotated[float, Field(gt=0.0)] = 1.0


class BF16Config(Section):
    """DeepSpeed bf16 mixed precision (no loss scaling needed)."""

    enabled: bool = False


PositiveInt = Annotated[int, Field(ge=1)]
BatchSize = Annotated[int, Field(ge=1, le=MAX_BATCH)]
Elements = Annotated[int, Field(ge=1, le=MAX_ELEMENTS)]
Elements0 = Annotated[int, Field(ge=0, le=MAX_ELEMENTS)]


class _Offload(Section):
    _key: ClassVar[str] = ""
    device: Literal["cpu"]
    pin_memory: bool = False

    _devices = model_validator(mode="before")(
        lambda cls, data: honoured.check_offload_device(cls._key, data)
    )


class OffloadOptimizerConfig(_Offload):
    """`zero_optimization.offload_optimizer`: fp32 master and optimizer state in host memory,
    the update on the host. `threads` (zeroshard's) sizes torch's CPU thread pool for it."""

    _key: ClassVar[str] = "offload_optimizer"
    threads: Optional[PositiveInt] = None


class OffloadParamConfig(_Offload):
    """`zero_optimization.offload_param` (stage 3): parameter shards in host memory."""

    _key: ClassVar[str] = "offload_param"


class ZeroOptimizationConfig(Section):
    """DeepSpeed's `zero_optimization` section. Sizes are element counts, as in DeepSpeed."""

    # "auto" here means "from the model's hidden size" (confighonoured.HIDDEN_SIZE_AUTOS)
    _auto_ok: ClassVar[frozenset[str]] = frozenset(
        k.split(".", 1)[1] for k in honoured.HIDDEN_SIZE_AUTOS
    )
    _float_ints: ClassVar[dict[str, int]] = dict.fromkeys(
        ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
         "stage3_param_persistence_threshold", "stage3_max_live_parameters",
         "stage3_max_reuse_distance"), MAX_ELEMENTS
    )  # fmt: skip

    stage: Literal[0, 1, 2, 3] = 0
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_scatter: bool = True
    reduce_bucket_size: Union[Elements, Auto] = 500_000_000
    allgather_partitions: bool = True
    allgather_bucket_size: Elements = 500_000_000
    stage3_prefetch_bucket_size: Union[Elements, Auto] = 50_000_000
    stage3_param_persistence_threshold: Union[Elements0, Auto] = 100_000
    stage3_max_live_parameters: Elements = 1_000_000_000
    stage3_max_reuse_distance: Elements0 = 1_000_000_000
    # zeroshard's own: stages 1-2 finish the updated parameters' all-gather behind the next
    # forward (shard/param_gather.py; docs/config.md)
    overlap_param_gather: bool = False
    # zeroshard's own: what one stage-3 unit is (stage3/grouping.py; docs/config.md)
    stage3_unit_grouping: Union[Literal["block", "module"], list[str]] = "block"
    stage3_gather_16bit_weights_on_model_save: bool = False
    load_from_fp32_weights: bool = True
    offload_optimizer: Optional[OffloadOptimizerConfig] = None
    offload_param: Optional[OffloadParamConfig] = None
    # ZeRO++ at stage 3 (config/zeropp.py; docs/config.md): qwZ, qgZ, hpZ
    zero_quantized_weights: bool = False
    zero_quantized_nontrainable_weights: bool = False
    zero_quantized_gradients: bool = False
    zero_hpz_partition_size: PositiveInt = 1

    _zeropp_bools = field_validator(*zeropp.ZEROPP_BOOL_KEYS, mode="before")(
        lambda cls, v: zeropp.strict_bool(v)
    )
    _zeropp_hpz = field_validator(zeropp.HPZ_KEY, mode="before")(lambda cls, v: zeropp.hpz_size(v))

    @property
    def zeropp(self) -> ZeroPPConfig:
        """The ZeRO++ settings (`.enabled` when any part is on)."""
        return ZeroPPConfig.of(self)

    # every key honoured as DeepSpeed defines it, or rejected by name: never silently ignored
    _no_offload = model_validator(mode="before")(honoured.drop_no_offload)
    _honoured = model_validator(mode="after")(honoured.check_honoured)

"""The zeroshard JSON config: a DeepSpeed-compatible schema, loading and validation.

Users arrive with DeepSpeed configs, so key names, nesting and defaults follow DeepSpeed's
(differences are listed in docs/config.md). Every section forbids unknown keys: a misspelled or
unsupported option must fail loudly, never be ignored, because ignoring it silently changes
training. All problems are reported as one :class:`ConfigError` naming the full key path.
"""

# pydantic evaluates field annotations at runtime, and `X | Y` fails there on Python 3.9
# (still supported by setup.py), so the models keep Optional/Union.
# ruff: noqa: UP007, UP045

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

import torch
from pydantic import (
    AliasChoices,
    BaseModel,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from zeroshard.config.errors import ConfigError, format_path, translate_validation_error
from zeroshard.config.honoured import BATCH_AUTOS, hidden_size_autos
from zeroshard.config.sections import (
    MAX_BATCH,
    OPTIMIZERS,
    SCHEDULERS,
    AdamOptimizer,
    AdamParams,
    AdamW8bitOptimizer,
    AdamW8bitParams,
    AdamWOptimizer,
    AdamWParams,
    Auto,
    BatchSize,
    BF16Config,
    FP16Config,
    LionOptimizer,
    LionParams,
    OffloadOptimizerConfig,
    OffloadParamConfig,
    OptimizerConfig,
    PositiveInt,
    SchedulerConfig,
    Section,
    SGDOptimizer,
    SGDParams,
    WarmupCosineLRConfig,
    WarmupCosineLRParams,
    WarmupDecayLRConfig,
    WarmupDecayLRParams,
    WarmupLRConfig,
    WarmupLRParams,
    ZeroOptimizationConfig,
)

__all__ = [
    "AdamOptimizer",
    "AdamParams",
    "AdamWOptimizer",
    "AdamWParams",
    "BF16Config",
    "ConfigError",
    "FP16Config",
    "LionOptimizer",
    "LionParams",
    "AdamW8bitOptimizer",
    "AdamW8bitParams",
    "OptimizerConfig",
    "SGDOptimizer",
    "SGDParams",
    "SchedulerConfig",
    "WarmupCosineLRConfig",
    "WarmupCosineLRParams",
    "WarmupDecayLRConfig",
    "WarmupDecayLRParams",
    "WarmupLRConfig",
    "WarmupLRParams",
    "ZeroConfig",
    "ZeroOptimizationConfig",
    "load_config",
]

# --------------------------------------------------------------------------- top level

_BATCH_KEYS = BATCH_AUTOS  # "auto" batch sizes are derived from the others (config/honoured.py)
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ZeroConfig(Section):
    """A validated zeroshard config. Build it with :func:`load_config`.

    After loading, the three batch sizes are concrete ints consistent with ``world_size``.
    Bucket sizes may still be "auto" until :meth:`resolve_auto` is called.
    """

    _auto_ok: ClassVar[frozenset[str]] = frozenset(_BATCH_KEYS)
    _float_ints: ClassVar[dict[str, int]] = dict.fromkeys(_BATCH_KEYS, MAX_BATCH)

    train_batch_size: Union[BatchSize, Auto, None] = None
    train_micro_batch_size_per_gpu: Union[BatchSize, Auto, None] = None
    gradient_accumulation_steps: Union[BatchSize, Auto, None] = None
    optimizer: Optional[OptimizerConfig] = None
    scheduler: Optional[SchedulerConfig] = None
    fp16: FP16Config = Field(default_factory=FP16Config)
    bf16: BF16Config = Field(
        default_factory=BF16Config, validation_alias=AliasChoices("bf16", "bfloat16")
    )
    communication_data_type: Optional[Literal["fp32", "fp16", "bf16"]] = None
    gradient_clipping: Annotated[float, Field(ge=0.0)] = 0.0
    steps_per_print: PositiveInt = 10
    wall_clock_breakdown: bool = False
    zero_optimization: ZeroOptimizationConfig = Field(default_factory=ZeroOptimizationConfig)
    kernel: Literal["auto", "triton", "torch"] = "auto"

    _world_size: int = PrivateAttr(default=1)

    @model_validator(mode="before")
    @classmethod
    def _one_bf16_spelling(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "bf16" in data and "bfloat16" in data:
            raise ValueError("give only one of `bf16` and its DeepSpeed alias `bfloat16`")
        return data

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> ZeroConfig:
        problems = []
        if self.fp16.enabled and self.bf16.enabled:
            problems.append("`fp16.enabled` and `bf16.enabled` are both true; enable at most one")
        opt = self.optimizer
        if opt is not None and getattr(opt.params, "torch_adam", False) and self.kernel == "triton":
            problems.append(
                '`optimizer.params.torch_adam` = true conflicts with `kernel` = "triton" '
                "(torch_adam selects the torch kernel); drop one of them"
            )
        if problems:
            raise ValueError("; ".join(problems))
        world_size = (info.context or {}).get("world_size", 1)
        self._derive_batch_sizes(world_size)
        self._world_size = world_size
        return self

    def _derive_batch_sizes(self, world_size: int) -> None:
        """DeepSpeed's rule: train_batch_size == micro * gas * world_size; derive the rest."""

        def given(v: int | str | None) -> int | None:
            return v if isinstance(v, int) else None

        tb = given(self.train_batch_size)
        mb = given(self.train_micro_batch_size_per_gpu)
        gas = given(self.gradient_accumulation_steps)
        values = (
            f"train_batch_size={self.train_batch_size}, "
            f"train_micro_batch_size_per_gpu={self.train_micro_batch_size_per_gpu}, "
            f"gradient_accumulation_steps={self.gradient_accumulation_steps}, "
            f"world_size={world_size}"
        )
        if tb is not None and mb is not None and gas is not None:
            if tb != mb * gas * world_size:
                raise ValueError(
                    "inconsistent batch sizes: `train_batch_size` must equal "
                    "`train_micro_batch_size_per_gpu` * `gradient_accumulation_steps` * "
                    f"world_size, but {tb} != {mb} * {gas} * {world_size} ({values})"
                )
        elif tb is not None:
            if mb is None and gas is None:
                gas = 1
            if mb is None:
                assert gas is not None
                mb, rem = divmod(tb, gas * world_size)
                missing = "train_micro_batch_size_per_gpu"
            else:
                gas, rem = divmod(tb, mb * world_size)
                missing = "gradient_accumulation_steps"
            if rem or mb == 0 or gas == 0:
                raise ValueError(
                    f"cannot derive `{missing}`: `train_batch_size` is not divisible by the "
                    f"product of the other batch sizes and world_size ({values})"
                )
        else:
            mb = 1 if mb is None else mb
            gas = 1 if gas is None else gas
            tb = mb * gas * world_size
        self.__dict__.update(
            train_batch_size=tb, train_micro_batch_size_per_gpu=mb, gradient_accumulation_steps=gas
        )

    # ---------------------------------------------------------------- derived views

    @property
    def world_size(self) -> int:
        """The world size the batch sizes were derived for."""
        return self._world_size

    @property
    def precision(self) -> Literal["fp32", "bf16", "fp16"]:
        """Training precision: "bf16" or "fp16" when that section is enabled, else "fp32"."""
        if self.bf16.enabled:
            return "bf16"
        return "fp16" if self.fp16.enabled else "fp32"

    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype of the model's working (non-master) parameters."""
        return _DTYPES[self.precision]

    @property
    def reduce_dtype(self) -> torch.dtype:
        """dtype gradients are reduced in: communication_data_type, else fp16 for fp16 runs
        (as DeepSpeed) and fp32 otherwise (bf16 sums lose too much precision)."""
        if self.communication_data_type is not None:
            return _DTYPES[self.communication_data_type]
        return torch.float16 if self.precision == "fp16" else torch.float32

    @property
    def effective_kernel(self) -> Literal["auto", "triton", "torch"]:
        """`kernel`, except that DeepSpeed's `optimizer.params.torch_adam` forces "torch"."""
        if self.optimizer is not None and getattr(self.optimizer.params, "torch_adam", False):
            return "torch"
        return self.kernel

    def optimizer_spec(self) -> tuple[str, dict[str, Any]]:
        """(update rule, every hyperparameter it needs), defaults filled in.

        The rule is one of "adamw", "adam", "sgd", "lion"; DeepSpeed "Adam" with adam_w_mode
        (its default) is decoupled-decay Adam, hence "adamw". No optimizer section means AdamW.
        """
        opt = self.optimizer if self.optimizer is not None else AdamWOptimizer(type="AdamW")
        p = opt.params
        if isinstance(p, AdamWParams):  # AdamParams included
            rule = "adamw" if p.adam_w_mode else "adam"
            return rule, {
                "lr": p.lr,
                "betas": tuple(p.betas),
                "eps": p.eps,
                "weight_decay": p.weight_decay,
                "amsgrad": p.amsgrad,
                "maximize": False,
            }
        if isinstance(p, SGDParams):
            return "sgd", {
                "lr": p.lr,
                "momentum": p.momentum,
                "dampening": p.dampening,
                "nesterov": p.nesterov,
                "weight_decay": p.weight_decay,
                "maximize": False,
            }
        if isinstance(p, AdamW8bitParams):
            return "adamw8bit", {
                "lr": p.lr, "betas": tuple(p.betas), "eps": p.eps,
                "weight_decay": p.weight_decay, "block_size": p.block_size,
                "min_8bit_size": p.min_8bit_size,
            }  # fmt: skip
        assert isinstance(p, LionParams)
        return "lion", {"lr": p.lr, "betas": tuple(p.betas), "weight_decay": p.weight_decay}

    def resolve_auto(self, hidden_size: int | None) -> ZeroConfig:
        """Copy with "auto" bucket sizes replaced by the Hugging Face integration's rules
        (honoured.HIDDEN_SIZE_AUTOS: reduce_bucket_size = h*h,
        stage3_prefetch_bucket_size = 0.9*h*h, stage3_param_persistence_threshold = 10*h)."""
        zo = self.zero_optimization
        autos = [k for k in sorted(zo._auto_ok) if getattr(zo, k) == "auto"]
        values = hidden_size_autos([f"zero_optimization.{k}" for k in autos], hidden_size)
        new = self.model_copy(deep=True)
        if values:
            new.zero_optimization = zo.model_copy(
                update={k.split(".", 1)[1]: v for k, v in values.items()}
            )
        return new


# --------------------------------------------------------------------------- loading


def _section_keys() -> tuple[dict[tuple, list[str]], dict[str, frozenset[str]]]:
    """Allowed keys per raw pydantic location, and the union tags found at each path."""
    allowed: dict[tuple, list[str]] = {}

    def keys(model: type[BaseModel]) -> list[str]:
        out = []
        for name, field in model.model_fields.items():
            alias = field.validation_alias
            out += list(alias.choices) if isinstance(alias, AliasChoices) else [name]  # type: ignore[arg-type]
        return out

    allowed[()] = keys(ZeroConfig)
    for name in ("zero_optimization", "fp16", "bf16", "bfloat16"):
        model = (
            ZeroOptimizationConfig
            if name == "zero_optimization"
            else (FP16Config if name == "fp16" else BF16Config)
        )
        allowed[(name,)] = keys(model)
    for name, model in (("offload_optimizer", OffloadOptimizerConfig),
                        ("offload_param", OffloadParamConfig)):  # fmt: skip
        allowed[("zero_optimization", name)] = keys(model)
    for section, table in (("optimizer", OPTIMIZERS), ("scheduler", SCHEDULERS)):
        for tag, model in table.items():
            allowed[(section, tag)] = keys(model)
            allowed[(section, tag, "params")] = keys(model.model_fields["params"].annotation)
    tags = {"optimizer": frozenset(OPTIMIZERS), "scheduler": frozenset(SCHEDULERS)}
    return allowed, tags


_ALLOWED_KEYS, _UNION_TAGS = _section_keys()


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ConfigError(f"key `{key}` appears twice in the same JSON object")
        seen[key] = value
    return seen


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise ConfigError(
            f"JSON nested deeper than Python's parser allows; a config nests at most "
            f"{MAX_DEPTH} levels",
            source=path,
        ) from None
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"malformed JSON at {path}, line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None
    except ConfigError as e:
        raise ConfigError(e.problems, source=path) from None


MAX_DEPTH = 32  # DeepSpeed configs nest a handful of levels; this bounds every walk


def _check_depth(data: Any) -> None:
    """ConfigError if `data` nests deeper than MAX_DEPTH (checked without recursion, before
    anything recursive such as deepcopy or validation runs)."""
    stack: list[tuple[Any, tuple]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if len(path) > MAX_DEPTH:
            shown = format_path(path[:4]) + "..."
            raise ConfigError(f"`{shown}` nests deeper than {MAX_DEPTH} levels; a config nests "
                              f"at most {MAX_DEPTH} levels of objects and lists")  # fmt: skip
        if isinstance(value, Mapping):
            stack += [(v, (*path, str(k))) for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            stack += [(v, (*path, i)) for i, v in enumerate(value)]


def _default_world_size() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def load_config(
    src: str | os.PathLike[str] | Mapping[str, Any], *, world_size: int | None = None
) -> ZeroConfig:
    """Load and validate a DeepSpeed-style config from a JSON file path or a mapping.

    ``world_size`` (default: torch.distributed's, or 1 when not initialized) is needed to derive
    and check the batch sizes. Raises :class:`ConfigError` listing every problem found.
    """
    source: str | None = None
    if isinstance(src, (str, os.PathLike)):
        source = os.fspath(src)
        data = _read_json(source)
        try:
            _check_depth(data)
        except ConfigError as e:
            raise ConfigError(e.problems, source=source) from None
    elif isinstance(src, Mapping):
        _check_depth(src)
        data = copy.deepcopy(dict(src))
    else:
        raise ConfigError(f"expected a JSON file path or a mapping, got {type(src).__name__}")
    if not isinstance(data, dict):
        raise ConfigError(
            f"the top level must be a JSON object, got {type(data).__name__}", source=source
        )
    if world_size is None:
        world_size = _default_world_size()
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world_size must be a positive int, got {world_size!r}", source=source)
    try:
        return ZeroConfig.model_validate(data, context={"world_size": world_size})
    except ValidationError as e:
        problems = translate_validation_error(e, _ALLOWED_KEYS, _UNION_TAGS)
        raise ConfigError(problems, source=source) from None


# Re-exported for users who want to render a path in their own messages.
format_key_path = format_path

"""The run configuration: shipped configs, defaults, batch derivation, "auto", error messages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from zeroshard.config.schema import ConfigError, ZeroConfig, load_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(path, world_size=2)
    stage = int(path.stem[4])
    assert cfg.zero_optimization.stage == stage
    assert cfg.precision == (
        "bf16" if "bf16" in path.stem else "fp16" if "fp16" in path.stem else "fp32"
    )
    assert cfg.train_batch_size == cfg.train_micro_batch_size_per_gpu * 2


def test_expected_configs_are_shipped() -> None:
    names = {p.name for p in CONFIGS}
    assert {
        "zero0.json",
        "zero1.json",
        "zero2.json",
        "zero2_bf16.json",
        "zero2_fp16.json",
        "zero3.json",
        "zero3_bf16.json",
    } <= names


def test_demo_config_uses_several_small_buckets() -> None:
    cfg = load_config(Path(CONFIGS[0]).parent / "zero2.json")
    assert cfg.zero_optimization.reduce_bucket_size <= 4_000_000
    assert cfg.gradient_clipping == 1.0
    assert (cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps) == (4, 1)


def test_defaults() -> None:
    cfg = load_config({}, world_size=1)
    assert (
        cfg.train_batch_size,
        cfg.train_micro_batch_size_per_gpu,
        cfg.gradient_accumulation_steps,
    ) == (1, 1, 1)
    zo = cfg.zero_optimization
    assert zo.stage == 0 and zo.overlap_comm and zo.contiguous_gradients and zo.reduce_scatter
    assert zo.reduce_bucket_size == 500_000_000 and zo.allgather_bucket_size == 500_000_000
    assert zo.stage3_prefetch_bucket_size == 50_000_000
    assert zo.stage3_param_persistence_threshold == 100_000
    assert zo.stage3_max_live_parameters == zo.stage3_max_reuse_distance == 1_000_000_000
    assert not zo.stage3_gather_16bit_weights_on_model_save and zo.load_from_fp32_weights
    assert cfg.precision == "fp32" and cfg.reduce_dtype == torch.float32
    assert cfg.gradient_clipping == 0.0 and cfg.steps_per_print == 10
    assert not cfg.wall_clock_breakdown and cfg.kernel == "auto" and cfg.scheduler is None
    fp16 = cfg.fp16
    assert (
        fp16.loss_scale,
        fp16.initial_scale_power,
        fp16.loss_scale_window,
        fp16.hysteresis,
        fp16.min_loss_scale,
        fp16.consecutive_hysteresis,
    ) == (0, 16, 1000, 2, 1, False)
    assert cfg.optimizer_spec() == (
        "adamw",
        {
            "lr": 1e-3,
            "betas": (0.9, 0.999),
            "eps": 1e-8,
            "weight_decay": 0.01,
            "amsgrad": False,
            "maximize": False,
        },
    )


@pytest.mark.parametrize(
    ("optimizer", "rule", "expected"),
    [
        ({"type": "adam"}, "adamw", {"weight_decay": 0.0, "eps": 1e-8}),
        (
            {"type": "Adam", "params": {"adam_w_mode": False, "weight_decay": 0.1}},
            "adam",
            {"weight_decay": 0.1},
        ),
        (
            {"type": "ADAMW", "params": {"lr": 3e-4, "betas": [0.8, 0.95]}},
            "adamw",
            {"lr": 3e-4, "betas": (0.8, 0.95)},
        ),
        (
            {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9, "nesterov": True}},
            "sgd",
            {
                "lr": 0.1,
                "momentum": 0.9,
                "dampening": 0.0,
                "nesterov": True,
                "weight_decay": 0.0,
                "maximize": False,
            },
        ),
        ({"type": "lion"}, "lion", {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0}),
    ],
)
def test_optimizer_spec(optimizer: dict, rule: str, expected: dict) -> None:
    got_rule, params = load_config({"optimizer": optimizer}).optimizer_spec()
    assert got_rule == rule
    assert params.items() >= expected.items()
    needed = {
        "adam": {"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"},
        "sgd": {"lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize"},
        "lion": {"lr", "betas", "weight_decay"},
    }
    assert set(params) == needed["adam" if rule == "adamw" else rule]


def test_torch_adam_selects_torch_kernel() -> None:
    cfg = load_config({"optimizer": {"type": "Adam", "params": {"torch_adam": True}}})
    assert cfg.effective_kernel == "torch"
    assert load_config({"kernel": "triton"}).effective_kernel == "triton"


@pytest.mark.parametrize(
    ("given", "world", "expected"),
    [
        ({}, 4, (4, 1, 1)),
        ({"train_batch_size": 32}, 4, (32, 8, 1)),
        ({"train_micro_batch_size_per_gpu": 3}, 2, (6, 3, 1)),
        ({"gradient_accumulation_steps": 5}, 2, (10, 1, 5)),
        ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 2}, 4, (32, 2, 4)),
        ({"train_batch_size": 32, "gradient_accumulation_steps": 2}, 4, (32, 4, 2)),
        ({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}, 4, (24, 2, 3)),
        (
            {
                "train_batch_size": 24,
                "train_micro_batch_size_per_gpu": 2,
                "gradient_accumulation_steps": 3,
            },
            4,
            (24, 2, 3),
        ),
        (
            {
                "train_batch_size": "auto",
                "train_micro_batch_size_per_gpu": 2,
                "gradient_accumulation_steps": "auto",
            },
            2,
            (4, 2, 1),
        ),
        ({"train_batch_size": 6.0e1, "train_micro_batch_size_per_gpu": 3}, 2, (60, 3, 10)),
    ],
)
def test_batch_derivation(given: dict, world: int, expected: tuple) -> None:
    cfg = load_config(given, world_size=world)
    got = (
        cfg.train_batch_size,
        cfg.train_micro_batch_size_per_gpu,
        cfg.gradient_accumulation_steps,
    )
    assert got == expected and all(type(v) is int for v in got)
    assert cfg.world_size == world


def test_world_size_defaults_to_one_without_distributed() -> None:
    assert load_config({"train_micro_batch_size_per_gpu": 3}).train_batch_size == 3


@pytest.mark.parametrize(
    ("section", "precision", "reduce"),
    [
        ({}, "fp32", torch.float32),
        ({"bf16": {"enabled": True}}, "bf16", torch.float32),
        ({"bfloat16": {"enabled": True}}, "bf16", torch.float32),
        ({"fp16": {"enabled": True}}, "fp16", torch.float16),
        ({"bf16": {"enabled": True}, "communication_data_type": "bf16"}, "bf16", torch.bfloat16),
        ({"fp16": {"enabled": True}, "communication_data_type": "fp32"}, "fp16", torch.float32),
    ],
)
def test_precision_and_reduce_dtype(section: dict, precision: str, reduce: torch.dtype) -> None:
    cfg = load_config(section)
    assert cfg.precision == precision and cfg.reduce_dtype == reduce


def test_float_sizes_are_coerced_to_int() -> None:
    zo = load_config(
        {"zero_optimization": {"reduce_bucket_size": 5e8, "allgather_bucket_size": 2e6}}
    ).zero_optimization
    assert zo.reduce_bucket_size == 500_000_000 and type(zo.reduce_bucket_size) is int
    assert zo.allgather_bucket_size == 2_000_000


def test_resolve_auto() -> None:
    cfg = load_config(
        {
            "zero_optimization": {
                "stage": 3,
                "reduce_bucket_size": "auto",
                "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto",
            }
        },
        world_size=2,
    )
    resolved = cfg.resolve_auto(hidden_size=1024)
    zo = resolved.zero_optimization
    assert zo.reduce_bucket_size == 1024 * 1024
    assert zo.stage3_prefetch_bucket_size == int(0.9 * 1024 * 1024)
    assert zo.stage3_param_persistence_threshold == 10 * 1024
    assert resolved.world_size == 2 and resolved.zero_optimization.stage == 3
    assert cfg.zero_optimization.reduce_bucket_size == "auto"  # the original is untouched
    plain = load_config({})
    assert plain.resolve_auto(None).zero_optimization.reduce_bucket_size == 500_000_000


def test_mapping_input_is_not_mutated() -> None:
    src: dict[str, Any] = {"train_batch_size": 8, "zero_optimization": {"stage": 2}}
    before = json.dumps(src, sort_keys=True)
    assert isinstance(load_config(src, world_size=2), ZeroConfig)
    assert json.dumps(src, sort_keys=True) == before


# --------------------------------------------------------------------------- bad configs

BAD: list[tuple[str, dict[str, Any], list[str]]] = [
    ("unknown_top", {"foo_bar": 1}, ["unknown key `foo_bar`", "allowed keys", "zero_optimization"]),
    (
        "typo_top",
        {"zero_optimisation": {"stage": 2}},
        ["unknown key `zero_optimisation`", "did you mean `zero_optimization`?"],
    ),
    (
        "typo_batch",
        {"train_micro_batch_size": 4},
        ["unknown key `train_micro_batch_size`", "did you mean `train_micro_batch_size_per_gpu`?"],
    ),
    (
        "unknown_zero",
        {"zero_optimization": {"stage": 2, "overlap_com": True}},
        [
            "unknown key `zero_optimization.overlap_com`",
            "did you mean `zero_optimization.overlap_comm`?",
            "allowed keys in `zero_optimization`",
        ],
    ),
    (
        "unknown_optimizer",
        {"optimizer": {"type": "AdamW", "parms": {}}},
        ["unknown key `optimizer.parms`", "did you mean `optimizer.params`?"],
    ),
    (
        "unknown_optimizer_param",
        {"optimizer": {"type": "AdamW", "params": {"momentum": 0.9}}},
        ["unknown key `optimizer.params.momentum`", "lr, betas, eps, weight_decay"],
    ),
    (
        "unknown_fp16",
        {"fp16": {"enabled": True, "loss_scale_windw": 10}},
        ["unknown key `fp16.loss_scale_windw`", "did you mean `fp16.loss_scale_window`?"],
    ),
    (
        "unknown_scheduler_param",
        {"scheduler": {"type": "WarmupLR", "params": {"warmup_steps": 10}}},
        ["unknown key `scheduler.params.warmup_steps`", "warmup_num_steps"],
    ),
    (
        "wrong_type",
        {"zero_optimization": {"overlap_comm": "sometimes"}},
        ["`zero_optimization.overlap_comm`", '"sometimes"', "valid boolean"],
    ),
    (
        "section_not_object",
        {"zero_optimization": 2},
        ["`zero_optimization` = 2", "must be a JSON object"],
    ),
    (
        "stage_7",
        {"zero_optimization": {"stage": 7}},
        ["`zero_optimization.stage` = 7", "0, 1, 2 or 3"],
    ),
    (
        "stage_bool",
        {"zero_optimization": {"stage": True}},
        ["`zero_optimization.stage` = true", "not a boolean"],
    ),
    (
        "conflicting_batch",
        {
            "train_batch_size": 10,
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 2,
        },
        [
            "train_batch_size=10",
            "train_micro_batch_size_per_gpu=2",
            "gradient_accumulation_steps=2",
            "world_size=2",
            "10 != 2 * 2 * 2",
        ],
    ),
    (
        "non_divisible_batch",
        {"train_batch_size": 10, "train_micro_batch_size_per_gpu": 3},
        [
            "cannot derive `gradient_accumulation_steps`",
            "train_batch_size=10",
            "train_micro_batch_size_per_gpu=3",
            "world_size=2",
        ],
    ),
    (
        "non_divisible_world",
        {"train_batch_size": 7},
        ["cannot derive `train_micro_batch_size_per_gpu`", "train_batch_size=7", "world_size=2"],
    ),
    (
        "zero_batch",
        {"train_micro_batch_size_per_gpu": 0},
        ["`train_micro_batch_size_per_gpu` = 0", "greater than or equal to 1"],
    ),
    (
        "fp16_and_bf16",
        {"fp16": {"enabled": True}, "bf16": {"enabled": True}},
        ["`fp16.enabled`", "`bf16.enabled`", "both true"],
    ),
    (
        "bf16_and_alias",
        {"bf16": {"enabled": True}, "bfloat16": {"enabled": True}},
        ["`bf16`", "`bfloat16`"],
    ),
    (
        "deepspeed_top",
        {"activation_checkpointing": {"partition_activations": True}},
        ["`activation_checkpointing` is a DeepSpeed option not supported by zeroshard yet"],
    ),
    (
        "deepspeed_top_flag",
        {"prescale_gradients": True},
        ["`prescale_gradients` is a DeepSpeed option not supported by zeroshard yet"],
    ),
    (
        "deepspeed_nested",
        {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/x"}}},
        ['`zero_optimization.offload_param.device` = "nvme" is not supported by zeroshard yet '
         '(offload to NVMe is not built); use "cpu", or "none" for no offload'],
    ),
    (
        "deepspeed_nested_fp16",
        {"fp16": {"enabled": True, "auto_cast": True}},
        ["`fp16.auto_cast` is a DeepSpeed option not supported by zeroshard yet"],
    ),
    (
        "deepspeed_alias_spelling",
        {"zero_optimization": {"prefetch_bucket_size": 100}},
        ["`zero_optimization.prefetch_bucket_size`", "stage3_prefetch_bucket_size"],
    ),
    (
        "bad_optimizer_type",
        {"optimizer": {"type": "Lamb", "params": {}}},
        ['`optimizer.type` = "Lamb"', "AdamW, Adam, SGD, Lion"],
    ),
    ("optimizer_not_object", {"optimizer": "adamw"}, ['`optimizer` = "adamw"', "JSON object"]),
    (
        "sgd_missing_lr",
        {"optimizer": {"type": "SGD", "params": {"momentum": 0.9}}},
        ["`optimizer.params.lr` is required"],
    ),
    (
        "nesterov_no_momentum",
        {"optimizer": {"type": "SGD", "params": {"lr": 0.1, "nesterov": True}}},
        ["`optimizer.params.nesterov`", "`optimizer.params.momentum` > 0", "momentum=0.0"],
    ),
    (
        "nesterov_dampening",
        {
            "optimizer": {
                "type": "SGD",
                "params": {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "nesterov": True},
            }
        },
        ["`optimizer.params.dampening` == 0", "dampening=0.1"],
    ),
    (
        "lr_auto",
        {"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}},
        ['`optimizer.params.lr` = "auto"', "only a Trainer fills", "outside one, give a number"],
    ),
    (
        "negative_lr",
        {"optimizer": {"type": "Lion", "params": {"lr": -1}}},
        ["`optimizer.params.lr` = -1", "greater than or equal to 0"],
    ),
    (
        "beta_out_of_range",
        {"optimizer": {"type": "AdamW", "params": {"betas": [0.9, 1.0]}}},
        ["`optimizer.params.betas[1]` = 1.0", "less than 1"],
    ),
    (
        "eps_zero",
        {"optimizer": {"type": "Adam", "params": {"eps": 0}}},
        ["`optimizer.params.eps` = 0", "greater than 0"],
    ),
    (
        "adamw_mode_off_under_adamw",
        {"optimizer": {"type": "AdamW", "params": {"adam_w_mode": False}}},
        ["`optimizer.params.adam_w_mode` = false", "True"],
    ),
    (
        "torch_adam_vs_triton",
        {"optimizer": {"type": "Adam", "params": {"torch_adam": True}}, "kernel": "triton"},
        ["`optimizer.params.torch_adam`", '`kernel` = "triton"'],
    ),
    (
        "negative_clipping",
        {"gradient_clipping": -1.0},
        ["`gradient_clipping` = -1.0", "greater than or equal to 0"],
    ),
    ("bad_kernel", {"kernel": "cuda"}, ['`kernel` = "cuda"', "'auto', 'triton' or 'torch'"]),
    (
        "bad_comm_dtype",
        {"communication_data_type": "fp8"},
        ['`communication_data_type` = "fp8"', "'fp32', 'fp16' or 'bf16'"],
    ),
    (
        "fractional_bucket",
        {"zero_optimization": {"reduce_bucket_size": 2.5}},
        ["`zero_optimization.reduce_bucket_size` = 2.5", "fractional part", "'auto'"],
    ),
    (
        "auto_not_allowed",
        {"zero_optimization": {"allgather_bucket_size": "auto"}},
        ['`zero_optimization.allgather_bucket_size` = "auto"', '"auto" has no meaning for this '
         "key; give a number"],
    ),
    ("clipping_auto", {"gradient_clipping": "auto"}, ['`gradient_clipping` = "auto"']),
    (
        "bad_scheduler_type",
        {"scheduler": {"type": "OneCycle", "params": {}}},
        ['`scheduler.type` = "OneCycle"', "WarmupLR, WarmupDecayLR, WarmupCosineLR"],
    ),
    (
        "decay_missing_total",
        {"scheduler": {"type": "WarmupDecayLR", "params": {}}},
        ["`scheduler.params.total_num_steps` is required"],
    ),
    (
        "decay_total_le_warmup",
        {
            "scheduler": {
                "type": "WarmupDecayLR",
                "params": {"total_num_steps": 100, "warmup_num_steps": 100},
            }
        },
        ["`scheduler.params.total_num_steps` (100)", "`scheduler.params.warmup_num_steps` (100)"],
    ),
    (
        "bad_warmup_type",
        {"scheduler": {"type": "WarmupLR", "params": {"warmup_type": "cos"}}},
        ['`scheduler.params.warmup_type` = "cos"', "'log' or 'linear'"],
    ),
    (
        "fp16_bad_window",
        {"fp16": {"enabled": True, "loss_scale_window": 0}},
        ["`fp16.loss_scale_window` = 0", "greater than or equal to 1"],
    ),
]


@pytest.mark.parametrize(("name", "config", "fragments"), BAD, ids=[b[0] for b in BAD])
def test_bad_config_message(name: str, config: dict, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(config, world_size=2)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_all_problems_are_collected() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            {
                "kernel": "cuda",
                "gradient_clipping": -1,
                "zero_optimization": {"stage": 9, "offload_optimizer": {}},
            }
        )
    err = info.value
    assert len(err.problems) == 4 and "4 problems" in str(err)
    for path in (
        "`kernel`",
        "`gradient_clipping`",
        "`zero_optimization.stage`",
        "`zero_optimization.offload_optimizer.device`",
    ):
        assert path in str(err)


def test_resolve_auto_needs_hidden_size() -> None:
    cfg = load_config({"zero_optimization": {"reduce_bucket_size": "auto"}})
    with pytest.raises(
        ConfigError,
        match=r"`zero_optimization.reduce_bucket_size` is \"auto\""
        r".*hidden_size=None.*give a number",
    ):
        cfg.resolve_auto(None)


def test_malformed_json_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text('{\n  "train_batch_size": 8,\n  "fp16": {"enabled": true,}\n}\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "line 3" in str(info.value)
    assert "column 28" in str(info.value)  # the stray `}`


def test_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match="not found") as info:
        load_config(str(path))
    assert str(path) in str(info.value)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 7}}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "`zero_optimization.stage` = 7" in str(info.value)


def test_duplicate_json_key(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text('{"gradient_clipping": 1.0, "gradient_clipping": 0.0}')
    with pytest.raises(ConfigError, match="`gradient_clipping` appears twice"):
        load_config(path)


@pytest.mark.parametrize("src", ["[1, 2]", '"zero"'])
def test_top_level_must_be_object(tmp_path: Path, src: str) -> None:
    path = tmp_path / "ds.json"
    path.write_text(src)
    with pytest.raises(ConfigError, match="top level must be a JSON object"):
        load_config(path)


@pytest.mark.parametrize("world", [0, -1, True, 1.5])
def test_bad_world_size(world: Any) -> None:
    with pytest.raises(ConfigError, match="world_size must be a positive int"):
        load_config({}, world_size=world)


def test_config_error_is_value_error() -> None:
    with pytest.raises(ValueError):
        load_config({"nope": 1})

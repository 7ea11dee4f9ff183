"""HF-style "auto" resolution (framework-free): HF's own ZeRO-2/3 templates, mismatches."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from zeroshard import ConfigError, load_config
from zeroshard.integrations.hf_config import resolve_hf_auto

DATA = Path(__file__).resolve().parents[1] / "data"


def _args(**kw):
    base = dict(
        world_size=2, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        max_grad_norm=1.0, learning_rate=3e-4, adam_beta1=0.9, adam_beta2=0.95,
        adam_epsilon=1e-8, weight_decay=0.1, warmup_steps=0.1, fp16=False,
        fp16_full_eval=False, bf16=True, bf16_full_eval=False,
    )  # fmt: skip
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize("stage", [2, 3])
def test_hf_templates_resolve_like_hf(stage):
    cfg = resolve_hf_auto(DATA / f"hf_ds_config_zero{stage}.json", _args(), hidden_size=32,
                          num_training_steps=100)
    assert cfg["train_batch_size"] == 16 and cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["gradient_clipping"] == 1.0
    assert cfg["optimizer"]["params"] == {
        "lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
    assert cfg["scheduler"]["params"] == {
        "warmup_min_lr": 0, "warmup_max_lr": 3e-4, "warmup_num_steps": 10}
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    zo = cfg["zero_optimization"]
    assert "offload_optimizer" not in zo and "sub_group_size" not in zo
    if stage == 3:
        assert zo["reduce_bucket_size"] == 1024
        assert zo["stage3_prefetch_bucket_size"] == int(0.9 * 1024)
        assert zo["stage3_param_persistence_threshold"] == 320
    parsed = load_config(cfg, world_size=2)
    assert parsed.zero_optimization.stage == stage and parsed.precision == "bf16"


def test_mismatch_is_reported_like_hf():
    cfg = {"gradient_accumulation_steps": 4, "optimizer": {"type": "AdamW",
           "params": {"lr": 1e-3}}}
    with pytest.raises(ConfigError) as e:
        resolve_hf_auto(cfg, _args(), hidden_size=32, num_training_steps=10)
    msg = str(e.value)
    assert "`gradient_accumulation_steps` = 4 in the config contradicts " \
        "TrainingArguments.gradient_accumulation_steps = 2" in msg  # fmt: skip
    assert "`optimizer.params.lr` = 0.001 in the config contradicts " \
        "TrainingArguments.learning_rate = 0.0003" in msg  # fmt: skip


def test_offload_to_cpu_is_kept_for_the_core():
    cfg = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    out = resolve_hf_auto(cfg, _args(), hidden_size=32, num_training_steps=10)
    assert out["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert load_config(out, world_size=2).zero_optimization.offload_optimizer.device == "cpu"


def test_trainer_fills_every_setting_the_config_leaves_out():
    cfg = {"zero_optimization": {"stage": 2},
           "scheduler": {"type": "WarmupDecayLR", "params": {}}}  # fmt: skip
    out = resolve_hf_auto(cfg, _args(optim="adamw_torch_fused"), hidden_size=32,
                          num_training_steps=100, fill_missing=True)  # fmt: skip
    assert out == {
        "zero_optimization": {"stage": 2},
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0, "fp16": {"enabled": False}, "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95],
                                                  "eps": 1e-8, "weight_decay": 0.1}},
        "scheduler": {"type": "WarmupDecayLR", "params": {
            "warmup_max_lr": 3e-4, "warmup_num_steps": 10, "total_num_steps": 100}},
    }  # fmt: skip
    parsed = load_config(out, world_size=2)
    assert parsed.train_batch_size == 16 and parsed.precision == "bf16"
    sgd = resolve_hf_auto({"optimizer": {"type": "SGD", "params": {"momentum": 0.9}}},
                          _args(), fill_missing=True)  # fmt: skip
    assert sgd["optimizer"]["params"] == {"momentum": 0.9, "lr": 3e-4, "weight_decay": 0.1}
    with pytest.raises(ConfigError, match="TrainingArguments.optim='adafactor' has no "
                       "zeroshard counterpart"):  # fmt: skip
        resolve_hf_auto({}, _args(optim="adafactor"), fill_missing=True)

"""DeepSpeed warmup schedules: expected lrs are worked out here from DeepSpeed's formulas
(deepspeed/runtime/lr_schedules.py), with i = DeepSpeed's last_batch_iteration = steps - 1."""

from __future__ import annotations

import math

import pytest
import torch

from zeroshard.config.schema import load_config
from zeroshard.schedulers import WarmupCosineLR, WarmupDecayLR, WarmupLR, build_scheduler


def _opt(*lrs: float) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0])


def _lr_after(sched: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    """Learning rates after `steps` scheduler steps (the optimizer step comes first, as usual)."""
    for _ in range(steps):
        sched.optimizer.step()
        sched.step()
    return [g["lr"] for g in sched.optimizer.param_groups]


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (0, 0.001),  # i = -1: DeepSpeed's value before the first step is warmup_min_lr
        (1, 0.001),  # i = 0: log(1) = 0
        (2, 0.001 + 0.009 * math.log(2) / math.log(10)),
        (5, 0.001 + 0.009 * math.log(5) / math.log(10)),
        (10, 0.01),  # i = 9: log(10)/log(10) = 1
        (50, 0.01),
    ],
)
def test_warmup_lr_log(steps: int, expected: float) -> None:
    sched = WarmupLR(_opt(0.5), warmup_min_lr=0.001, warmup_max_lr=0.01, warmup_num_steps=10)
    assert _lr_after(sched, steps)[0] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("steps", "expected"), [(0, 0.0), (1, 0.0), (4, 0.3 * 3 / 10), (11, 0.3)])
def test_warmup_lr_linear(steps: int, expected: float) -> None:
    sched = WarmupLR(_opt(0.5), warmup_max_lr=0.3, warmup_num_steps=10, warmup_type="linear")
    assert _lr_after(sched, steps)[0] == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_warmup_lr_max_defaults_to_each_groups_lr() -> None:
    sched = WarmupLR(_opt(0.1, 0.02), warmup_num_steps=4, warmup_type="linear")
    assert _lr_after(sched, 3) == pytest.approx([0.1 * 2 / 4, 0.02 * 2 / 4])
    assert _lr_after(sched, 10) == pytest.approx([0.1, 0.02])


def test_warmup_num_steps_is_clamped_to_two_like_deepspeed() -> None:
    sched = WarmupLR(_opt(1.0), warmup_max_lr=1.0, warmup_num_steps=1)
    assert _lr_after(sched, 2)[0] == pytest.approx(math.log(2) / math.log(2))


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (0, 0.001),
        (6, 0.001 + 0.009 * 5 / 10),  # i = 5, warmup
        (11, 0.01),  # i = 10: (20 - 10) / (20 - 10) = 1
        (16, 0.001 + 0.009 * (20 - 15) / 10),
        (21, 0.001),  # i = 20: decayed back to warmup_min_lr
        (40, 0.001),  # clamped at 0, never below min
    ],
)
def test_warmup_decay_lr(steps: int, expected: float) -> None:
    sched = WarmupDecayLR(
        _opt(0.5),
        total_num_steps=20,
        warmup_min_lr=0.001,
        warmup_max_lr=0.01,
        warmup_num_steps=10,
        warmup_type="linear",
    )
    assert _lr_after(sched, steps)[0] == pytest.approx(expected, rel=1e-12)


def _cos_ratio(i: int, total: int = 20, warmup: int = 4, cos_min: float = 0.01) -> float:
    progress = min(1.0, (i - warmup + 1) / (total - warmup))
    return cos_min + (1 - cos_min) * (1 + math.cos(math.pi * progress)) / 2


@pytest.mark.parametrize(
    ("steps", "ratio"),
    [
        (0, 0.0),  # i = -1: DeepSpeed returns 0 before the first step
        (1, 0.1),  # i = 0: warmup_min_ratio
        (3, 0.1 + 0.9 * 2 / 4),
        (5, _cos_ratio(4)),
        (12, _cos_ratio(11)),
        (20, 0.01),  # i = 19: progress reaches 1
        (35, 0.01),  # stays at the floor
    ],
)
def test_warmup_cosine_lr(steps: int, ratio: float) -> None:
    sched = WarmupCosineLR(
        _opt(0.1, 0.2),
        total_num_steps=20,
        warmup_min_ratio=0.1,
        warmup_num_steps=4,
        cos_min_ratio=0.01,
        warmup_type="linear",
    )
    assert _lr_after(sched, steps) == pytest.approx([0.1 * ratio, 0.2 * ratio], rel=1e-12)


def test_warmup_cosine_log_warmup() -> None:
    sched = WarmupCosineLR(_opt(1.0), total_num_steps=100, warmup_num_steps=10)
    assert _lr_after(sched, 4)[0] == pytest.approx(math.log(4) / math.log(10))


@pytest.mark.parametrize(
    "make",
    [
        lambda o: WarmupLR(o, warmup_max_lr=0.1, warmup_num_steps=10),
        lambda o: WarmupDecayLR(o, total_num_steps=30, warmup_max_lr=0.1, warmup_num_steps=10),
        lambda o: WarmupCosineLR(o, total_num_steps=30, warmup_num_steps=10),
    ],
)
def test_state_dict_round_trip(make) -> None:
    a = make(_opt(0.1))
    _lr_after(a, 13)
    state = a.state_dict()
    b = make(_opt(0.1))
    b.load_state_dict(state)
    assert _lr_after(b, 5) == pytest.approx(_lr_after(a, 5))


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="warmup_num_steps"):
        WarmupLR(_opt(0.1), warmup_num_steps=0)
    with pytest.raises(ValueError, match="warmup_type"):
        WarmupLR(_opt(0.1), warmup_type="cosine")
    with pytest.raises(ValueError, match="one per param group"):
        WarmupLR(_opt(0.1, 0.2), warmup_max_lr=[0.1])


def test_build_scheduler_from_config() -> None:
    assert build_scheduler(load_config({}).scheduler, _opt(0.1)) is None
    cfg = load_config({"scheduler": {"type": "warmupcosinelr", "params": {"total_num_steps": 50}}})
    sched = build_scheduler(cfg.scheduler, _opt(0.1))
    assert isinstance(sched, WarmupCosineLR)
    assert (sched.total_num_steps, sched.warmup_num_steps, sched.cos_min_ratio) == (50, 1000, 1e-4)
    cfg = load_config(
        {
            "scheduler": {
                "type": "WarmupDecayLR",
                "params": {"total_num_steps": 50, "warmup_num_steps": 10},
            }
        }
    )
    sched = build_scheduler(cfg.scheduler, _opt(0.1))
    assert isinstance(sched, WarmupDecayLR) and sched.max_lrs == [0.001]
    sched = build_scheduler(load_config("configs/zero2.json").scheduler, _opt(0.1))
    assert isinstance(sched, WarmupLR) and sched.warmup_type == "linear"

"""Rank jobs for tests/test_seams_ii.py (run on the shared gloo pool of tests/conftest.py)."""

from __future__ import annotations

import warnings

import torch

import zeroshard
from tests.models import batch, loss_fn, make_model


def warnings_of_a_plain_run(stage: int) -> list[str]:
    """A few steps of `zeroshard.initialize` and of the drop-in optimizer, recording every
    warning (the pool ignores FutureWarning; this job shows them all)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for how in ("initialize", "drop-in"):
            torch.manual_seed(0)
            model = make_model()
            if how == "initialize":
                cfg = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": stage}}
                model, opt = zeroshard.initialize(model, cfg)
            else:
                opt = zeroshard.ZeroOptimizer(model.parameters(), "adamw", stage=min(stage, 2))
            for step in range(2):
                x, y = batch(step, 8)
                opt.backward(loss_fn(model, x, y))
                opt.step()
                opt.zero_grad()
            del opt
    return [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in seen]

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


def accelerate_run(stage: int, path: str) -> dict | str:
    """Accelerate, the documented way (zeroshard.initialize, then `prepare` the data loader
    only) or the wrong one (`prepare(model, optimizer, loader)`): final params or the error."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from tests import seams_jobs as sj

    # split_batches: each global batch is cut across the ranks, as the reference trains it
    acc = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(split_batches=True))
    torch.set_num_threads(1)  # Accelerate raised it for this pool process
    model, opt = sj.build(stage)
    xs, ys = zip(*(batch(s, sj.GLOBAL_BATCH) for s in range(sj.STEPS)))
    data = torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys))
    loader = torch.utils.data.DataLoader(data, batch_size=sj.GLOBAL_BATCH)
    if path == "prepare_model":
        model, opt, loader = acc.prepare(model, opt, loader)
    else:
        loader = acc.prepare(loader)

    def train() -> dict:
        for x, y in loader:
            acc.backward(loss_fn(model, x, y))
            opt.step()
            opt.zero_grad()
        return {"params": sj.full_params(model), "world": acc.num_processes}

    return sj.error_of(train) if path == "prepare_model" else train()

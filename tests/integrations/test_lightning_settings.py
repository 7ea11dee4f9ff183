"""ZeroShardStrategy takes what the config leaves out from the Lightning Trainer and
configure_optimizers (optimizer, its hyperparameters, accumulation, bf16, the micro-batch
size from the train loader, as Lightning's DeepSpeedStrategy does), steps the scheduler
configure_optimizers returns as Lightning does, and lists every contradiction."""

import numpy as np

from tests.integrations.launch import read_json, require, torchrun


def test_lightning_scheduler_and_settings_from_the_trainer(tmp_path):
    require("lightning")
    out = tmp_path / "pl.json"
    log = torchrun("lightning_settings_run.py", str(out))
    r = read_json(out)
    ddp = r["ddp"]
    assert len(ddp["losses"]) == 16
    assert ddp["lrs"][::2] == [0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01, 0.01, 0.01]
    for stage in ("z2", "z3"):
        z = r[stage]
        assert z["lrs"] == ddp["lrs"] and z["gas"] == 2
        # the loader's batch_size=4, accumulate 2, 2 ranks (not the config's default of 1)
        assert z["batch"] == [4, 2, 16]
        np.testing.assert_allclose(z["losses"], ddp["losses"], rtol=1e-5)
    assert r["bf16"] == "bf16"
    assert r["mismatch"] == (
        "ConfigError: invalid zeroshard config (2 problems):\n"
        "  - `gradient_accumulation_steps` = 4 in the config contradicts the Trainer's "
        "accumulate_grad_batches = 2\n"
        "  - `optimizer.params.lr` = 0.001 in the config contradicts the Trainer's "
        "configure_optimizers() lr = 0.01"
    )
    assert r["micro"] == (
        "ConfigError: invalid zeroshard config: `train_micro_batch_size_per_gpu` = 8 in the "
        "config contradicts the Trainer's "
        "train_dataloader batch_size = 4"
    )
    said = [ln for ln in log.splitlines() if ln.startswith("zeroshard: from the Lightning")]
    assert said[0] == (
        "zeroshard: from the Lightning Trainer: bf16.enabled (precision='32-true'), "
        "gradient_accumulation_steps (accumulate_grad_batches), optimizer.params.betas "
        "(configure_optimizers() betas), optimizer.params.eps (configure_optimizers() eps), "
        "optimizer.params.lr (configure_optimizers() lr), optimizer.params.weight_decay "
        "(configure_optimizers() weight_decay), optimizer.type (configure_optimizers() "
        "optimizer), train_micro_batch_size_per_gpu (train_dataloader batch_size); from the "
        "config: none; scheduler: LambdaLR"
    ), said

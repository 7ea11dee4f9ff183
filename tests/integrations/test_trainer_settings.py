"""ZeroShardTrainer takes every setting the config leaves out from TrainingArguments (lr,
weight decay, betas, eps, scheduler and warmup, clipping, accumulation, micro-batch,
bf16), errors on a contradiction listing every mismatch, and logs where each came from;
a zeroshard optimizer in plain `Trainer(optimizers=...)` gets an error naming the way;
`zeroshard consolidate` of its checkpoint loads with from_pretrained; tied weights once."""

import numpy as np

from tests.integrations.launch import read_json, require, torchrun


def test_trainer_settings_fill_what_the_config_leaves_out(tmp_path):
    require("transformers", "accelerate")
    out = tmp_path / "hf.json"
    log = torchrun("hf_settings_run.py", str(out), str(tmp_path / "work"))
    r = read_json(out)
    ddp = r["ddp"]
    assert r["world"] == 2 and len(ddp["loss"]) == 8 and max(ddp["grad_norm"]) > 0.5
    for stage in ("z2", "z3"):
        z = r[stage]
        assert (z["betas"], z["eps"], z["wd"]) == ([0.9, 0.95], 1e-7, [0.2, 0.0])
        assert (z["clip"], z["gas"], z["micro"]) == (0.5, 2, 4)
        assert z["lr"] == ddp["lr"]  # the Trainer's linear schedule with 3 warmup steps
        np.testing.assert_allclose(z["loss"], ddp["loss"], rtol=1e-5)
        np.testing.assert_allclose(z["grad_norm"], ddp["grad_norm"], rtol=1e-5)
        # `zeroshard consolidate` of a ZeroShardTrainer checkpoint writes config.json:
        # from_pretrained gives the trained model's logits exactly
        assert z["consolidated_equal"] is True
        # save_model writes the tied lm_head.weight once: the 28 tensors save_pretrained of
        # the unsharded model writes (measured), not 29
        assert z["saved_keys"] == 28
    assert r["bf16"] == {"precision": "bf16", "dtype": "torch.bfloat16"}
    assert r["mismatch"] == (
        "ConfigError: invalid zeroshard config (2 problems):\n"
        "  - `gradient_clipping` = 1.0 in the config contradicts TrainingArguments.max_grad_norm "
        "= 0.5: set it to \"auto\" or leave it out (the Trainer fills it)\n"
        "  - `optimizer.params.lr` = 0.001 in the config contradicts "
        "TrainingArguments.learning_rate = 0.003: set it to \"auto\" or leave it out (the "
        "Trainer fills it)"
    )
    assert "ZeroShardTrainer(zeroshard_config=...) instead of Trainer(optimizers=" \
        in r["plain_trainer"], r["plain_trainer"]  # fmt: skip
    said = [ln for ln in log.splitlines() if ln.startswith("zeroshard: from TrainingArguments")]
    assert len(said) == 3, log[-3000:]  # one per ZeroShardTrainer that trained, rank 0 only
    assert said[0] == (
        "zeroshard: from TrainingArguments: bf16.enabled=false, fp16.enabled=false, "
        "gradient_accumulation_steps=2, gradient_clipping=0.5, optimizer.params.betas=[0.9, "
        "0.95], optimizer.params.eps=1e-07, optimizer.params.lr=0.003, "
        "optimizer.params.weight_decay=0.2, optimizer.type=\"AdamW\", "
        "train_micro_batch_size_per_gpu=4; from the config: none; scheduler: the Trainer's "
        "(lr_scheduler_type, warmup_steps or warmup_ratio)"
    )

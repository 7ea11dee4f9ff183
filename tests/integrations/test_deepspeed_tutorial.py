"""A DeepSpeed-tutorial-style script (tests/scripts/ds_tutorial.py) with only its import
changed: add_config_arguments, zero.Init, initialize(args=...), deepspeed.comm,
GatheredParameters, save_16bit_model, save and load, at stages 2 and 3 with accumulation 2
and clipping, against real DeepSpeed on CPU (2 gloo ranks, fp32, torch AdamW)."""

import argparse
import json

import numpy as np
import pytest
import torch

import zeroshard.integrations.deepspeed as shim
from tests.integrations.launch import read_json, require, torchrun


def _config(stage: int) -> dict:
    zo = {"stage": stage, "reduce_bucket_size": 100000, "allgather_bucket_size": 100000}
    if stage == 3:
        zo.update(stage3_param_persistence_threshold=100,
                  stage3_gather_16bit_weights_on_model_save=True)
    return {
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
        "gradient_clipping": 0.1, "steps_per_print": 1000,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.1,
                                                  "torch_adam": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 3e-3,
                                                     "warmup_num_steps": 4}},
        "zero_optimization": zo,
    }  # fmt: skip


def test_tutorial_script_matches_deepspeed_with_only_the_import_changed(tmp_path):
    require("deepspeed")
    paths = []
    for stage in (2, 3):
        paths.append(tmp_path / f"zero{stage}.json")
        paths[-1].write_text(json.dumps(_config(stage)))
    runs = {}
    for mode in ("shim", "ds"):
        out = tmp_path / f"{mode}.json"
        torchrun("ds_tutorial.py", mode, "--deepspeed", "--deepspeed_config", str(paths[0]),
                 "--more-configs", str(paths[1]), "--out", str(out), "--work",
                 str(tmp_path / "work"), timeout=240, reference=mode == "ds")  # fmt: skip
        runs[mode] = read_json(out)
    for name in ("zero2", "zero3"):
        shim, ds = runs["shim"][name], runs["ds"][name]
        assert shim["boundaries"] == ds["boundaries"] == [False, True] * 8
        assert (shim["steps"], shim["lr"], shim["device"]) == (8, [3e-3], "cpu")
        assert (shim["rank"], shim["local"], shim["local_rank"]) == (0, 0, 0)
        assert shim["gathered"] == ds["gathered"] == [0.0, 1.0]
        assert shim["broadcast"] == ds["broadcast"] == 7.0
        assert len(shim["norms"]) == 8 and min(shim["norms"]) > 0.1  # clipping is active
        np.testing.assert_allclose(shim["norms"], ds["norms"], rtol=1e-4)
        # measured: losses 1.1e-7, norms 9.6e-8 relative; resume exact for both
        np.testing.assert_allclose(shim["losses"], ds["losses"], rtol=1e-4)
        np.testing.assert_allclose(shim["resumed"], shim["losses"][8:], rtol=1e-6)
        np.testing.assert_allclose(ds["resumed"], ds["losses"][8:], rtol=1e-6)
        assert shim["head"] == pytest.approx(ds["head"], rel=1e-4, abs=1e-4)
        assert shim["eval"] == pytest.approx(ds["eval"], rel=1e-4)
        assert shim["saved"].keys() == ds["saved"].keys()
        for k, v in ds["saved"].items():
            assert shim["saved"][k] == pytest.approx(v, rel=1e-4, abs=1e-4), k


def test_what_the_shim_lacks_is_an_error_naming_it():
    with pytest.raises(AttributeError, match=r"^deepspeed.pipe is not supported by zeroshard's "
                       r"DeepSpeed shim \(zeroshard.integrations.deepspeed\)$"):
        shim.pipe  # noqa: B018
    with pytest.raises(AttributeError, match=r"^deepspeed.comm.all_to_all_single is not "):
        shim.comm.all_to_all_single  # noqa: B018
    with pytest.raises(ValueError, match=r"^deepspeed.zero.Init\(remote_device=...\) is not "
                       "supported by zeroshard's DeepSpeed shim$"):
        shim.zero.Init(remote_device="cpu")
    args = shim.add_config_arguments(argparse.ArgumentParser()).parse_args(
        ["--deepspeed", "--deepspeed_config", "ds.json"])
    assert (args.deepspeed, args.deepspeed_config) == (True, "ds.json")
    with pytest.raises(ValueError, match=r"^initialize: a config was given both as config= and "
                       r"as args.deepspeed_config \(ds.json\); give one of them$"):
        shim.initialize(args=args, model=torch.nn.Linear(2, 2), config={})
    engine, *_ = shim.initialize(model=torch.nn.Linear(2, 2), config={"kernel": "torch"})
    assert engine.weight is engine.module.weight  # the module's own attributes pass through
    with pytest.raises(AttributeError, match=r"^engine.monitor is not supported by zeroshard's "
                       r"DeepSpeed shim"):
        engine.monitor  # noqa: B018
    assert (shim.comm.get_rank(), shim.comm.get_world_size(), shim.comm.get_local_rank()) == \
        (0, 1, 0)  # fmt: skip

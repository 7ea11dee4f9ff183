"""ZeroShardStrategy vs Lightning + AdamW under DDP (2 gloo ranks, accumulate 2,
gradient_clip_val 0.3), stages 2 and 3, and resume from an epoch-end checkpoint."""

import numpy as np

from tests.integrations.launch import read_json, require, torchrun


def test_lightning_matches_ddp_adamw_and_resumes(tmp_path):
    require("lightning")
    out = tmp_path / "pl.json"
    torchrun("lightning_run.py", str(out), str(tmp_path / "work"))
    r = read_json(out)
    ddp = r["ddp"]
    assert ddp["model"] == "DistributedDataParallel" and len(ddp["losses"]) == 40
    for stage, wrapper in (("z2", "Net"), ("z3", "_Stage3Root")):
        z = r[stage]
        assert z["model"] == wrapper  # no DDP wrapper
        assert z["ckpt_is_dir"]  # a zeroshard checkpoint folder: every rank's shard
        np.testing.assert_allclose(z["losses"], ddp["losses"], rtol=1e-5)
        assert z["norm"] > 0.3  # the last step was clipped (gradient_clip_val=0.3)
        res = z["resumed"]["losses"]
        # The first resumed micro-batch sees exactly the restored weights.
        assert res[0] == z["losses"][20]
        # Lightning itself resumes an epoch-end checkpoint one micro-batch out of its
        # accumulation phase (DDP does the same): the resumed run matches DDP's resumed run.
        np.testing.assert_allclose(res, ddp["resumed"]["losses"], rtol=1e-5)

"""ZeroShardStrategy with Lightning's precision "16-mixed": fp16 with zeroshard's loss scaler,
against Lightning's own DDP run with "16-mixed" (autocast + torch's GradScaler), stages 2
and 3; one rank's overflowing micro-batch skips that step on every rank and halves the scale,
as the GradScaler does."""

import json

import numpy as np

from tests.integrations.launch import require, torchrun


def test_lightning_16_mixed_matches_ddp_amp_and_skips_overflow(tmp_path):
    require("lightning")
    out = tmp_path / "pl.json"
    torchrun("lightning_fp16_run.py", str(out))
    ranks = [json.loads((tmp_path / f"pl.json.rank{r}").read_text()) for r in (0, 1)]
    for r in ranks:
        ddp = r["ddp"]
        assert ddp["precision"] == "16-mixed" and len(ddp["losses"]) == 16
        # DDP's GradScaler skipped the overflowed step (micro-batches 6-7) and halved its scale
        assert ddp["scales"] == [2.0**16] * 8 + [2.0**15] * 8
        for stage in ("z2", "z3"):
            z = r[stage]
            assert (z["precision"], z["config_precision"]) == ("16-mixed", "fp16")
            # every rank skipped that one step and lowered its scale, rank 0 whose own
            # gradients were finite included
            assert z["skipped"] == 1
            assert z["scales"] == ddp["scales"]
            # fp16 weights and fp16 gradient reduction vs DDP's fp32 weights under autocast:
            # measured at most 3e-5 relative over the 16 micro-batches
            np.testing.assert_allclose(z["losses"], ddp["losses"], rtol=2e-4)

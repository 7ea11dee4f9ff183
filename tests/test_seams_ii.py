"""The launcher and the library never drop a setting silently: one test (or more) per item.

1. torchrun / `zeroshard run` without init_process_group: initialize starts the group; a
   drop-in optimizer refuses at construction.  9. a plain run prints no warning of ours.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zeroshard
from tests import seams2_jobs as jobs

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "train_plain.py"


def _zs(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}  # fmt: skip
    env.pop("ZEROSHARD_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "zeroshard.cli.main", *argv], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip


# 1 -------------------------------------------------------------------------------------------
def test_1_plain_script_without_init_process_group_trains_on_every_rank(tmp_path):
    p = _zs("run", "--standalone", "--nproc", "2", "--config", "configs/zero2.json",
            str(SCRIPT), "--no-init", "--steps", "4", "--out", str(tmp_path))  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("rank*.json"))]
    assert [(r["rank"], r["world"]) for r in ranks] == [(0, 2), (1, 2)]
    # each rank sees its own half of the batch: equal weights mean they trained together
    assert ranks[0]["losses"] != ranks[1]["losses"]
    assert ranks[0]["param_sum"] == ranks[1]["param_sum"]
    said = "zeroshard: started the torch.distributed process group (gloo, world size 2) from " \
           "the launcher's environment"  # fmt: skip
    assert p.stderr.count(said) == 1, p.stderr[-3000:]


def test_1_drop_in_optimizer_under_a_launcher_without_group_is_an_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    model = torch.nn.Linear(4, 2)
    with pytest.raises(RuntimeError) as e:
        zeroshard.ZeroOptimizer(model.parameters(), "adamw", stage=2)
    assert str(e.value) == (
        "rank 1: WORLD_SIZE=2 is set (launched by torchrun or `zeroshard run`) but no "
        "torch.distributed process group exists, so this rank would train alone: call "
        "torch.distributed.init_process_group() before building the optimizer, or use "
        "zeroshard.initialize(model, config), which starts the process group from the "
        "launcher's environment"
    )
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2 is set"):
        zeroshard.Init({"zero_optimization": {"stage": 3}})
    monkeypatch.setenv("WORLD_SIZE", "1")  # a plain single process still just works
    opt = zeroshard.ZeroOptimizer(model.parameters(), "adamw", stage=2)
    assert opt.comm.world_size == 1


# 9 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [2, 3])
def test_9_plain_run_prints_no_warning_of_ours(dist_run, stage):
    for seen in dist_run(2, jobs.warnings_of_a_plain_run, stage):
        assert seen == []


# 6 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [2, 3])
def test_6_accelerate_documented_path_trains_like_torch(dist_run, stage):
    pytest.importorskip("accelerate")
    from tests.test_seams import assert_trains_like_torch

    results = dist_run(2, jobs.accelerate_run, stage, "documented")
    assert [r["world"] for r in results] == [2, 2]
    assert_trains_like_torch(results)


def test_6_accelerate_prepare_model_names_the_documented_path(dist_run):
    pytest.importorskip("accelerate")
    for r, err in enumerate(dist_run(2, jobs.accelerate_run, 2, "prepare_model")):
        assert err.startswith(f"RuntimeError: rank {r}: a zeroshard model runs inside "
                              "DistributedDataParallel: "), err
        assert err.endswith(
            "with Accelerate build model and optimizer with zeroshard.initialize(model, "
            "config) and pass only the data loaders to accelerator.prepare "
            "(docs/integrations.md)"
        ), err

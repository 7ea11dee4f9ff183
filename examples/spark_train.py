"""zeroshard under Spark's `TorchDistributor` (2 local processes, CPU): a run that saves a
zeroshard checkpoint mid-way and returns its path, then a second run resumed from that path.

    python examples/spark_train.py --stage 2 --out /tmp/spark.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
STEPS, SAVE_AT = 10, 5


def train_fn(stage: int, save_dir: str, resume: str | None) -> dict:
    """Runs on every process TorchDistributor starts; every rank returns the same dict (the
    losses are averaged over the ranks), so whichever rank's result Spark keeps is right."""
    import tiny_task
    import torch
    import torch.distributed as dist

    import zeroshard

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, opt = tiny_task.initialize(stage)
    start = 0
    if resume is not None:
        _, client = zeroshard.load_checkpoint(resume, model, opt)
        start = client["step"]
    losses, checkpoint = [], None
    for stop in (SAVE_AT, STEPS):
        if start >= stop:
            continue
        losses += tiny_task.train_steps(model, opt, start, stop, rank, world)
        start = stop
        if stop == SAVE_AT:
            zeroshard.save_checkpoint(save_dir, model, opt, client_state={"step": stop})
            checkpoint = save_dir
    dist.destroy_process_group()
    return {"losses": losses, "checkpoint": checkpoint}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--save-dir", default=os.path.join(tempfile.gettempdir(), "zs_spark"))
    a = p.parse_args()
    # the processes TorchDistributor starts import this folder's modules by name
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(HERE), HERE, os.environ.get("PYTHONPATH", "")])

    from pyspark.ml.torch.distributor import TorchDistributor
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master("local[2]").appName("zeroshard")
             .config("spark.ui.enabled", "false").getOrCreate())  # fmt: skip
    dist = TorchDistributor(num_processes=2, local_mode=True, use_gpu=False)
    first = dist.run(train_fn, a.stage, a.save_dir, None)
    resumed = dist.run(train_fn, a.stage, a.save_dir, first["checkpoint"])
    spark.stop()
    out = {"losses": first["losses"], "resumed": resumed["losses"]}
    print(json.dumps(out))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()

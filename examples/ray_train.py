"""zeroshard under Ray Train: `TorchTrainer` on 2 CPU workers, a checkpoint reported through
`ray.train.report` (each worker writes its zeroshard checkpoint file into its own temporary
folder; Ray merges them), and a second run resumed from the mid-run checkpoint.

    python examples/ray_train.py --stage 2 --out /tmp/ray.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_task  # noqa: E402

STEPS, SAVE_AT = 10, 5


def train_loop(config: dict) -> None:
    import ray.train

    import zeroshard

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model, opt = zeroshard.initialize(tiny_task.build_model(), tiny_task.config(config["stage"]))
    start = 0
    # Ray Train v2's pattern: the run's own latest checkpoint (after a worker restart), else
    # the one handed in through the config (resuming another run). Ray merged every worker's
    # folder into one: a complete zeroshard checkpoint, loadable at any world size.
    ckpt = ray.train.get_checkpoint() or config.get("resume_from")
    if ckpt is not None:
        with ckpt.as_directory() as d:
            _, client = zeroshard.load_checkpoint(d, model, opt)
            start = client["step"]
    losses: list[float] = []
    for stop in (SAVE_AT, STEPS):
        if start >= stop:
            continue
        losses += tiny_task.train_steps(model, opt, start, stop, rank, world)
        start = stop
        # Each worker saves into its own temporary folder (no shared disk): its own
        # rank file, plus the manifest listing every rank's files; Ray uploads and merges them.
        with tempfile.TemporaryDirectory() as tmp:
            zeroshard.save_checkpoint(tmp, model, opt, tag="ckpt", client_state={"step": stop})
            ray.train.report({"step": stop, "losses": losses},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--storage", default=os.path.join(tempfile.gettempdir(), "zs_ray"))
    a = p.parse_args()

    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    here = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join([os.path.dirname(here), here, os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})

    def trainer(name: str, resume=None) -> TorchTrainer:
        return TorchTrainer(
            train_loop, train_loop_config={"stage": a.stage, "resume_from": resume},
            scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
            run_config=RunConfig(name=name, storage_path=a.storage,
                                 checkpoint_config=CheckpointConfig(num_to_keep=None)),
        )  # fmt: skip

    first = trainer(f"zeroshard_stage{a.stage}").fit()
    mid = next(c for c, m in first.best_checkpoints if m["step"] == SAVE_AT)
    resumed = trainer(f"zeroshard_stage{a.stage}_resumed", resume=mid).fit()
    files = sorted(os.path.relpath(os.path.join(r, f), mid.path)
                   for r, _, fs in os.walk(mid.path) for f in fs)  # fmt: skip
    out = {"losses": first.metrics["losses"], "resumed": resumed.metrics["losses"],
           "checkpoint_files": files}
    print(json.dumps(out))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f)
    ray.shutdown()


if __name__ == "__main__":
    main()

"""zeroshard under Ray Train: `TorchTrainer` on 2 CPU workers, a checkpoint reported through
`ray.train.report` (each worker writes its own optimizer shard into its own temporary
folder; rank 0 adds the weights), and a second run resumed from the mid-run checkpoint.

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


def save_shards(model, opt, folder: str, rank: int, step: int) -> None:
    """Every worker: its optimizer shard; rank 0 also the full weights (at stage 3 every
    rank takes part in gathering them)."""
    from safetensors.torch import save_file

    from zeroshard.stage3.state_dict import full_state_dict

    torch.save(opt.state_dict(), os.path.join(folder, f"optim_rank{rank}.pt"))
    weights = full_state_dict(model, rank0_only=True)
    if rank == 0:
        weights = {k: v.contiguous().clone() for k, v in weights.items()}
        weights.pop("lm_head.weight", None)  # tied to wte.weight
        save_file(weights, os.path.join(folder, "model.safetensors"))
        with open(os.path.join(folder, "meta.json"), "w") as f:
            json.dump({"step": step}, f)


def train_loop(config: dict) -> None:
    import ray.train
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model, start, shard = tiny_task.build_model(), 0, None
    # Ray Train v2's pattern: the run's own latest checkpoint (after a worker restart), else
    # the one handed in through the config (resuming another run).
    ckpt = ray.train.get_checkpoint() or config.get("resume_from")
    if ckpt is not None:
        with ckpt.as_directory() as d:
            model.load_state_dict(load_file(os.path.join(d, "model.safetensors")), strict=False)
            shard = torch.load(os.path.join(d, f"optim_rank{rank}.pt"), weights_only=True)
            with open(os.path.join(d, "meta.json")) as f:
                start = json.load(f)["step"]
    import zeroshard

    model, opt = zeroshard.initialize(model, tiny_task.config(config["stage"]))
    if shard is not None:
        opt.load_state_dict(shard)
    losses: list[float] = []
    for stop in (SAVE_AT, STEPS):
        if start >= stop:
            continue
        losses += tiny_task.train_steps(model, opt, start, stop, rank, world)
        start = stop
        with tempfile.TemporaryDirectory() as tmp:  # this worker's own folder
            save_shards(model, opt, tmp, rank, stop)
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
    out = {"losses": first.metrics["losses"], "resumed": resumed.metrics["losses"],
           "checkpoint_files": sorted(os.listdir(mid.path))}
    print(json.dumps(out))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f)
    ray.shutdown()


if __name__ == "__main__":
    main()

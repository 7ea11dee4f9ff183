"""A DeepSpeed-tutorial-style script: `add_config_arguments`, `init_distributed`,
`zero.Init`, `initialize(args=...)`, `deepspeed.comm`, accumulation and clipping from the
config, `save_checkpoint` / `load_checkpoint`, `GatheredParameters`, `save_16bit_model`.

    torchrun ... ds_tutorial.py ds|shim --deepspeed --deepspeed_config zero2.json \\
        [--more-configs zero3.json] --out OUT.json --work DIR

`ds` and `shim` differ only in the import line. Each config is trained in turn (one launch
for several stages); rank 0 writes what each run saw to OUT.json."""

import argparse
import json
import os
import sys

import torch
from torch import nn

if sys.argv[1] == "shim":
    import zeroshard.integrations.deepspeed as deepspeed
else:
    import deepspeed

torch.set_num_threads(1)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 32)
        self.body = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 64)

    def forward(self, x, y):
        h = self.emb(x)
        logits = self.head(h + self.body(h)).float()
        return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())


g = torch.Generator().manual_seed(0)
data = torch.utils.data.TensorDataset(torch.randint(0, 64, (128, 8), generator=g),
                                      torch.randint(0, 64, (128, 8), generator=g))


def build(args):
    stage = json.load(open(args.deepspeed_config))["zero_optimization"]["stage"]
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=args.deepspeed_config, enabled=stage == 3):
        model = Net()
    engine, _, loader, _ = deepspeed.initialize(
        args=args, model=model, model_parameters=model.parameters(), training_data=data)
    return engine, loader


def mean_over_ranks(loss):
    t = loss.detach().clone()
    deepspeed.comm.all_reduce(t)
    return t.item() / deepspeed.comm.get_world_size()


def train(engine, loader, start, stop, ckpt):
    engine.train()
    losses, boundaries, norms = [], [], []
    for i, (x, y) in enumerate(loader):
        if i < start:
            continue
        if i == stop:
            break
        loss = engine(x.to(engine.device), y.to(engine.device))
        engine.backward(loss)
        boundaries.append(engine.is_gradient_accumulation_boundary())
        engine.step()
        if boundaries[-1]:
            norms.append(float(engine.get_global_grad_norm()))
        losses.append(mean_over_ranks(loss))
        if i + 1 == 8 and ckpt:
            engine.save_checkpoint(ckpt, client_state={"next": i + 1})
    return losses, boundaries, norms


def run(args, work):
    engine, loader = build(args)
    losses, boundaries, norms = train(engine, loader, 0, 16, os.path.join(work, "ckpt"))
    with deepspeed.zero.GatheredParameters(list(engine.module.head.parameters())):
        head = engine.module.head.weight.detach().double().sum().item()
    engine.eval()
    with torch.no_grad():
        x, y = data[:4]
        eval_loss = mean_over_ranks(engine(x, y))
    engine.save_16bit_model(os.path.join(work, "final"))
    deepspeed.comm.barrier()
    saved = torch.load(os.path.join(work, "final", "pytorch_model.bin"), weights_only=True)
    out = {
        "losses": losses, "boundaries": boundaries, "norms": norms, "lr": engine.get_lr(),
        "head": head, "eval": eval_loss, "steps": engine.global_steps,
        "local_rank": engine.local_rank, "device": str(engine.device),
        "rank": deepspeed.comm.get_rank(),
        "local": deepspeed.comm.get_local_rank(),
        "saved": {k: v.double().sum().item() for k, v in saved.items()},
    }  # fmt: skip
    engine, loader = build(args)
    _, client = engine.load_checkpoint(os.path.join(work, "ckpt"))
    out["resumed"], _, _ = train(engine, loader, client["next"], 16, None)
    ranks = [torch.zeros(1) for _ in range(deepspeed.comm.get_world_size())]
    deepspeed.comm.all_gather(ranks, torch.tensor([float(deepspeed.comm.get_rank())]))
    flag = torch.tensor([7.0 if deepspeed.comm.get_rank() == 0 else 0.0])
    deepspeed.comm.broadcast(flag, 0)
    out["gathered"], out["broadcast"] = [float(r) for r in ranks], float(flag)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["ds", "shim"])
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--more-configs", nargs="*", default=[])
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", required=True)
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()
    deepspeed.init_distributed()
    results = {}
    for path in [args.deepspeed_config, *args.more_configs]:
        args.deepspeed_config = path
        name = os.path.splitext(os.path.basename(path))[0]
        results[name] = run(args, os.path.join(args.work, args.mode, name))
    if deepspeed.comm.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    deepspeed.comm.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

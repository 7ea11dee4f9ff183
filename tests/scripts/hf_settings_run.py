"""Run under torchrun (2 gloo ranks): a ZeroShardTrainer whose settings live only in
TrainingArguments (the config names the stage) against Trainer + AdamW under DDP; bf16 from
the arguments; a config contradicting them; and `Trainer(optimizers=(zeroshard opt, None))`.
Rank 0 writes the results as JSON to argv[1]."""

import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors import safe_open
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import zeroshard
from zeroshard.cli.main import main as cli_main
from zeroshard.integrations.transformers import ZeroShardTrainer

torch.set_num_threads(1)
OUT, WORK = sys.argv[1], sys.argv[2]


class Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(0, 64, (96, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64,
                                      n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, initializer_range=0.5))


def args(name: str, **kw) -> TrainingArguments:
    base = dict(
        output_dir=os.path.join(WORK, name), per_device_train_batch_size=4,
        gradient_accumulation_steps=2, max_grad_norm=0.5, learning_rate=3e-3, weight_decay=0.2,
        adam_beta2=0.95, adam_epsilon=1e-7, max_steps=8, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, optim="adamw_torch", lr_scheduler_type="linear",
        warmup_steps=3, seed=0, dataloader_drop_last=True, disable_tqdm=True,
    )  # fmt: skip
    base.update(kw)
    return TrainingArguments(**base)


def history(trainer) -> dict:
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"loss": [h["loss"] for h in logs], "grad_norm": [h["grad_norm"] for h in logs],
            "lr": [h["learning_rate"] for h in logs]}


def error_of(fn) -> str:
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


STAGE_ONLY = {"zero_optimization": {"stage": 2}, "kernel": "torch"}
results = {}
t = Trainer(model=model(), args=args("ddp"), train_dataset=Tokens())
t.train()
results["ddp"] = history(t)
for stage in (2, 3):
    cfg = {"zero_optimization": {"stage": stage}, "kernel": "torch"}
    t = ZeroShardTrainer(model=model(), args=args(f"z{stage}", save_strategy="steps",
                                                  save_steps=8),
                         train_dataset=Tokens(), zeroshard_config=cfg)
    t.train()
    g = t.optimizer.param_groups[0]
    results[f"z{stage}"] = {**history(t), "betas": list(g["betas"]), "eps": g["eps"],
                            "wd": [x["weight_decay"] for x in t.optimizer.param_groups],
                            "clip": t.optimizer.config.gradient_clipping,
                            "gas": t.optimizer.config.gradient_accumulation_steps,
                            "micro": t.optimizer.config.train_micro_batch_size_per_gpu}
    # consolidate the last checkpoint: config.json comes with it; logits as trained
    ids = Tokens().ids[:2]
    t.model.eval()
    with torch.no_grad():
        trained = t.model(input_ids=ids).logits  # every rank (stage 3 gathers)
    final = os.path.join(WORK, f"z{stage}", "final")
    t.save_model(final)
    if dist.get_rank() == 0:
        out = os.path.join(WORK, f"z{stage}", "consolidated")
        ckpt = os.path.join(WORK, f"z{stage}", "checkpoint-8", "zeroshard")
        rc = cli_main(["consolidate", ckpt, out])
        again = GPT2LMHeadModel.from_pretrained(out).eval()
        with torch.no_grad():
            results[f"z{stage}"]["consolidated_equal"] = torch.equal(again(input_ids=ids).logits,
                                                                     trained)
        with safe_open(os.path.join(final, "model.safetensors"), "pt") as f:
            results[f"z{stage}"]["saved_keys"] = len(list(f.keys()))
t = ZeroShardTrainer(model=model(), args=args("bf16", bf16=True, max_steps=1),
                     train_dataset=Tokens(), zeroshard_config=STAGE_ONLY)
t.train()
results["bf16"] = {"precision": t.optimizer.config.precision,
                   "dtype": str(next(t.model.parameters()).dtype)}
bad = {**STAGE_ONLY, "gradient_clipping": 1.0,
       "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.2}}}
t = ZeroShardTrainer(model=model(), args=args("bad", max_steps=1), train_dataset=Tokens(),
                     zeroshard_config=bad)
results["mismatch"] = error_of(t.train)
a = args("plain", max_steps=1)
m = model()
opt = zeroshard.ZeroOptimizer(m.parameters(), "adamw", stage=2, lr=1e-3)
t = Trainer(model=m, args=a, train_dataset=Tokens(), optimizers=(opt, None))
results["plain_trainer"] = error_of(t.train)
results["world"] = dist.get_world_size()
if dist.get_rank() == 0:
    with open(OUT, "w") as f:
        json.dump(results, f)
dist.barrier()
dist.destroy_process_group()

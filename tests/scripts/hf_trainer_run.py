"""Run under torchrun (2 gloo ranks): HF Trainer + AdamW under DDP vs ZeroShardTrainer at
stages 2 and 3 (accumulation 2, max_grad_norm 1.0), resume from checkpoint-10, stage-3
save_model, and HF's ZeRO-2/3 templates (with and without their offload sections). Rank 0
writes the results as JSON to argv[1]."""

import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from zeroshard.integrations.transformers import ZeroShardTrainer

torch.set_num_threads(1)
OUT, WORK = sys.argv[1], sys.argv[2]
DATA = os.path.join(os.path.dirname(__file__), "..", "data")
STEPS, LR = 20, 1e-3


class Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (160, 16), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     initializer_range=0.5)
    return GPT2LMHeadModel(cfg)


def args(name: str, **kw) -> TrainingArguments:
    base = dict(
        output_dir=os.path.join(WORK, name), per_device_train_batch_size=4,
        gradient_accumulation_steps=2, max_grad_norm=1.0, learning_rate=LR, weight_decay=0.1,
        max_steps=STEPS, logging_steps=1, save_steps=10, save_strategy="steps",
        report_to=[], use_cpu=True, optim="adamw_torch", lr_scheduler_type="linear",
        warmup_steps=2, seed=0, dataloader_drop_last=True, disable_tqdm=True,
    )
    base.update(kw)
    return TrainingArguments(**base)


def history(trainer) -> dict:
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"loss": [h["loss"] for h in logs], "grad_norm": [h["grad_norm"] for h in logs],
            "step": [h["step"] for h in logs]}


ZS = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
      "train_batch_size": "auto", "gradient_clipping": "auto",
      "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                "weight_decay": "auto"}},
      "bf16": {"enabled": "auto"}, "kernel": "torch"}

results = {}
t = Trainer(model=model(), args=args("ddp"), train_dataset=Tokens())
t.train()
results["ddp"] = history(t)
results["ddp_wrapped"] = type(t.model_wrapped).__name__
for stage in (2, 3):
    cfg = {**ZS, "zero_optimization": {"stage": stage, "reduce_bucket_size": "auto"}}
    t = ZeroShardTrainer(model=model(), args=args(f"z{stage}"), train_dataset=Tokens(),
                         zeroshard_config=cfg)
    t.train()
    r = history(t)
    r["wrapped"] = type(t.model_wrapped).__name__
    r["reduce_bucket_size"] = t.optimizer.config.zero_optimization.reduce_bucket_size
    t2 = ZeroShardTrainer(model=model(), args=args(f"z{stage}"), train_dataset=Tokens(),
                          zeroshard_config=cfg)
    t2.train(resume_from_checkpoint=os.path.join(WORK, f"z{stage}", "checkpoint-10"))
    r["resumed"] = history(t2)
    final = os.path.join(WORK, f"z{stage}", "final")
    t2.save_model(final)  # every rank; stage 3 gathers collectively
    direct = os.path.join(WORK, f"z{stage}", "direct")
    t2.model.save_pretrained(direct)  # every rank, as HF documents for sharded models
    if dist.get_rank() == 0:
        saved = GPT2LMHeadModel.from_pretrained(final)
        r["saved_numel"] = sum(p.numel() for p in saved.parameters())
        again = GPT2LMHeadModel.from_pretrained(direct)
        r["direct_equal"] = all(torch.equal(a, b) for a, b in
                                zip(saved.state_dict().values(), again.state_dict().values()))
        r["ckpt_files"] = sorted(os.listdir(os.path.join(WORK, f"z{stage}", "checkpoint-10")))
    results[f"z{stage}"] = r
for stage in (2, 3):  # HF's own templates, "auto" everywhere: build and take 2 steps
    path = os.path.join(DATA, f"hf_ds_config_zero{stage}.json")
    t = ZeroShardTrainer(model=model(), args=args(f"tpl{stage}", max_steps=1, save_steps=100),
                         train_dataset=Tokens(), zeroshard_config=path)
    t.train()
    c = t.optimizer.config
    results[f"template{stage}"] = {
        "stage": c.zero_optimization.stage, "lr": t.optimizer.param_groups[0]["initial_lr"],
        "clip": c.gradient_clipping, "batch": c.train_batch_size,
        "sched": type(t.lr_scheduler).__name__, "loss": history(t)["loss"],
    }
for stage in (2, 3):  # HF's templates as its docs ship them (offload to cpu), and without
    with open(os.path.join(DATA, f"hf_ds_config_zero{stage}_offload.json")) as f:
        shipped = json.load(f)
    runs = {}
    for name in ("offload", "removed"):
        cfg = json.loads(json.dumps(shipped))
        if name == "removed":
            for key in ("offload_optimizer", "offload_param"):
                cfg["zero_optimization"].pop(key, None)
        t = ZeroShardTrainer(model=model(), args=args(f"off{stage}{name}", max_steps=4,
                                                      save_steps=100),
                             train_dataset=Tokens(), zeroshard_config=cfg)
        t.train()
        mem = t.optimizer.memory_report("host")
        runs[name] = {"loss": history(t)["loss"], "placement": t.optimizer.placement.name,
                      "host_master": mem["master"], "host_states": mem["optimizer_states"],
                      "host_params": mem["params"]}
    results[f"offload{stage}"] = runs
results["world"] = dist.get_world_size()
if dist.get_rank() == 0:
    with open(OUT, "w") as f:
        json.dump(results, f)
dist.barrier()
dist.destroy_process_group()

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
        "launcher's environment (TrainingArguments and Accelerator() start it too: create them "
        "before the optimizer)"
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
    from tests import seams_jobs

    results = dist_run(2, jobs.accelerate_run, stage, "documented")
    assert [r["world"] for r in results] == [2, 2]
    want = seams_jobs.reference()["params"]  # single-process torch AdamW, global batch
    for r in results:
        assert r["params"].keys() == want.keys()
        for name, value in want.items():
            torch.testing.assert_close(r["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)


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


# 5 -------------------------------------------------------------------------------------------
def _check_config(capsys, path, *extra: str) -> tuple[int, list[str]]:
    from zeroshard.cli.main import main

    rc = main(["check-config", str(path), *extra])
    return rc, capsys.readouterr().out.splitlines()


def _runtime_problems(cfg: dict) -> list[str]:
    """What zeroshard.initialize itself raises for `cfg` (world size 1)."""
    with pytest.raises(zeroshard.ConfigError) as e:
        zeroshard.initialize(torch.nn.Linear(2, 2), cfg)
    return e.value.problems


BAD = {  # one problem each; together in one file, check-config must list all of them
    "batch": {"train_batch_size": 7, "train_micro_batch_size_per_gpu": 2},
    "bool": {"gradient_clipping": True},
    "precision": {"fp16": {"enabled": True}, "bf16": {"enabled": True}},
    "scatter": {"zero_optimization": {"reduce_scatter": False}},
    "partitions": {"zero_optimization": {"allgather_partitions": False}},
    "unknown": {"tensorboard": {"enabled": True}},
}


def test_5_check_config_lists_every_problem_at_once_as_the_runtime_words_it(capsys, tmp_path):
    want, merged = [], {"zero_optimization": {"stage": 2}}
    for cfg in BAD.values():
        want += _runtime_problems({**cfg, "zero_optimization": {
            "stage": 2, **cfg.get("zero_optimization", {})}})  # fmt: skip
        for k, v in cfg.items():
            merged[k] = {**merged[k], **v} if isinstance(v, dict) and k in merged else v
    assert len(want) == len(BAD)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(merged))
    rc, lines = _check_config(capsys, path)
    refused = [ln.split("  ", 1)[1].strip() for ln in lines if ln.startswith("refused")]
    assert rc == 1 and len(refused) == len(BAD), lines
    for problem in want:  # one line per problem, in the runtime's words
        assert sum(ln.endswith("  " + problem) for ln in refused) == 1, (problem, lines)
    assert lines[-1] == f"{path}: NOT usable: {len(BAD)} problems (world size 1)"


def test_5_check_config_agrees_with_the_runtime_on_no_effect_keys(capsys, tmp_path):
    cfg = {"wall_clock_breakdown": True, "steps_per_print": 5,
           "optimizer": {"type": "Adam", "params": {"adam_w_mode": False}},
           "zero_optimization": {"stage": 3, "reduce_bucket_size": 100,
                                 "contiguous_gradients": True}}  # fmt: skip
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(cfg))
    rc, lines = _check_config(capsys, path)
    verdict = {ln[14:].split()[0]: ln[:12].strip() for ln in lines[:-1]}
    assert rc == 0 and verdict == {
        "wall_clock_breakdown": "used",  # the runtime prints the breakdown
        "steps_per_print": "used",  # ... every 5 steps
        "optimizer.type": "used",
        "optimizer.params.adam_w_mode": "used",  # false: Adam with L2 decay ("adam")
        "zero_optimization.stage": "used",
        "zero_optimization.reduce_bucket_size": "used",  # bounds stage 3's buckets
        "zero_optimization.contiguous_gradients": "no effect",
    }, lines  # fmt: skip
    runtime = zeroshard.load_config(cfg)
    assert runtime.optimizer_spec()[0] == "adam"
    from zeroshard.config.honoured import stage3_bucket_numel

    assert stage3_bucket_numel(runtime.zero_optimization) == 100


def test_5_hf_templates_are_usable_and_say_what_the_trainer_fills(capsys):
    path = ROOT / "tests" / "data" / "hf_ds_config_zero3.json"
    rc, lines = _check_config(capsys, path, "--world-size", "2")
    assert rc == 0, lines
    assert lines[-1] == (f"{path}: usable with ZeroShardTrainer, which fills 13 values from "
                         "TrainingArguments (world size 2)")  # fmt: skip
    row = next(ln for ln in lines if " optimizer.params.lr " in ln)
    assert row.split() == ["resolved", "optimizer.params.lr", '"auto"', "filled", "by", "the",
                           "Trainer", "from", "TrainingArguments.learning_rate"]  # fmt: skip
    sub = next(ln for ln in lines if "sub_group_size" in ln)
    assert sub.startswith("no effect") and sub.endswith("ZeroShardTrainer drops this DeepSpeed "
                                                        "knob")  # fmt: skip


def test_5_auto_and_boolean_errors_are_worded_by_type():
    with pytest.raises(zeroshard.ConfigError) as e:
        zeroshard.load_config({
            "optimizer": {"type": "AdamW", "params": {"betas": True, "amsgrad": "auto",
                                                      "eps": "auto"}},
            "bf16": {"enabled": "auto"}})  # fmt: skip
    assert sorted(e.value.problems) == sorted([
        "`optimizer.params.betas` = true: must be a list of numbers, not a boolean",
        '`optimizer.params.amsgrad` = "auto": "auto" has no meaning for this key; give true or '
        "false",
        '`optimizer.params.eps` = "auto": is "auto", which only a Trainer fills (ZeroShardTrainer '
        "and the Hugging Face Trainer fill it from their arguments; `zeroshard check-config "
        "--hf` lists them); outside one, give a number",
        '`bf16.enabled` = "auto": is "auto", which only a Trainer fills (ZeroShardTrainer and '
        "the Hugging Face Trainer fill it from their arguments; `zeroshard check-config --hf` "
        "lists them); outside one, give true or false",
    ])  # fmt: skip


# 7 -------------------------------------------------------------------------------------------
def test_7_consolidate_with_hf_config_loads_with_from_pretrained(capsys, tmp_path):
    transformers = pytest.importorskip("transformers")
    from zeroshard.cli.main import main

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8)
    model = transformers.GPT2LMHeadModel(cfg)
    model, opt = zeroshard.initialize(model, {"zero_optimization": {"stage": 2}})
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        opt.backward(model(input_ids=ids, labels=ids).loss)
        opt.step()
        opt.zero_grad()
    ckpt = zeroshard.save_checkpoint(tmp_path / "ckpt", model, opt)
    model.config.save_pretrained(tmp_path / "hf")  # what --hf-config points at
    assert main(["consolidate", str(ckpt), str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / "config.json").exists()  # unknown: nothing invented
    assert main(["consolidate", str(ckpt), str(tmp_path / "out"), "--hf-config",
                 str(tmp_path / "hf")]) == 0  # fmt: skip
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
    capsys.readouterr()
    bad = main(["consolidate", str(ckpt), str(tmp_path / "x"), "--hf-config",
                str(tmp_path / "nope")])  # fmt: skip
    assert bad == 2
    assert capsys.readouterr().err == (
        f"zeroshard consolidate: error: hf_config: {tmp_path / 'nope'} does not exist\n"
    )


# 10 ------------------------------------------------------------------------------------------
def test_10_save_load_consolidate_estimate_show_progress_when_slow(capsys, tmp_path, monkeypatch):
    from tests.models import make_model
    from zeroshard.cli.main import main

    def run_all() -> None:
        model, opt = zeroshard.initialize(make_model(), {"zero_optimization": {"stage": 2}})
        ckpt = zeroshard.save_checkpoint(tmp_path / "ckpt", model, opt, tag="t")
        zeroshard.load_checkpoint(tmp_path / "ckpt", model, opt, tag="t")
        zeroshard.consolidate(ckpt, tmp_path / "out")
        assert main(["estimate", "--params", "7e9", "--world-size", "8"]) == 0

    run_all()  # quick work: no bar at all
    assert "zeroshard: " not in capsys.readouterr().err
    monkeypatch.setenv("ZEROSHARD_PROGRESS_DELAY", "0")  # as if each had run for > 2 s
    run_all()
    err = capsys.readouterr().err
    for what in ("saving t", "loading t", "consolidating model.safetensors",
                 "estimating 8 ranks"):  # fmt: skip
        assert f"zeroshard: {what}: 100%" in err, err


def test_5_run_lists_every_problem_check_config_finds(tmp_path):
    from zeroshard.cli.check_config import config_problems

    template = ROOT / "tests" / "data" / "hf_ds_config_zero3.json"
    assert config_problems(str(template), 2) == []  # what ZeroShardTrainer accepts
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"tensorboard": {"enabled": True},
                                "zero_optimization": {"stage": 2, "reduce_scatter": False}}))
    p = _zs("run", "--nproc", "2", "--config", str(path), str(SCRIPT))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.splitlines() == [
        f"zeroshard run: error: invalid zeroshard config in {path} (2 problems):",
        "  - `tensorboard` is a DeepSpeed option not supported by zeroshard yet",
        "  - zero_optimization.reduce_scatter: false is not supported by zeroshard yet "
        "(gradients are always reduce-scattered and partitions all-gathered); remove the key "
        "or set it to true",
    ]  # fmt: skip

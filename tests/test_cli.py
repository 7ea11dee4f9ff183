"""The `zeroshard` command: run, estimate, check-config, consolidate, env.

`run` is driven as a user would (a subprocess launching torchrun on 2 gloo ranks); the other
subcommands through `zeroshard.cli.main.main(argv)` in this process.
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
from zeroshard.cli.main import SUBCOMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "train_plain.py"


def zs(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("ZEROSHARD_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "zeroshard.cli.main", *argv], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


# -- run ----------------------------------------------------------------------------------------
def test_run_trains_a_plain_script_with_the_config(tmp_path):
    p = zs("run", "--standalone", "--nproc", "2", "--config", "configs/zero2.json", str(SCRIPT),
           "--steps", "6", "--out", str(tmp_path))  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("rank*.json"))]
    assert sorted(r["rank"] for r in lines) == [0, 1]
    for r in lines:
        assert r["world"] == 2 and r["stage"] == 2
        assert r["config"] == str(ROOT / "configs" / "zero2.json")
        # same two batches alternate: the loss on each fell
        assert r["losses"][4] < r["losses"][0] and r["losses"][5] < r["losses"][1], r["losses"]


def test_run_missing_config_is_one_line_and_launches_nothing(tmp_path):
    p = zs("run", "--nproc", "2", "--config", str(tmp_path / "nope.json"), str(SCRIPT))
    assert p.returncode != 0
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert f"config file not found: {tmp_path / 'nope.json'}" in p.stderr
    assert "final loss" not in p.stdout


def test_run_bad_keys_one_line_each(tmp_path):
    cfg = json.loads((ROOT / "configs" / "zero2.json").read_text())
    cfg["zero_optimization"]["reduce_bucket_sise"] = 10
    cfg["fp16"] = {"enabld": True}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    p = zs("run", "--nproc", "2", "--config", str(path), str(SCRIPT))
    assert p.returncode != 0
    lines = p.stderr.splitlines()
    assert "Traceback" not in p.stderr and len(lines) == 3, p.stderr
    assert lines[0] == f"zeroshard run: error: invalid zeroshard config in {path} (2 problems):"
    assert sorted(ln.split("`")[1] for ln in lines[1:]) == [
        "fp16.enabld", "zero_optimization.reduce_bucket_sise"]
    assert all(ln.startswith("  - unknown key `") for ln in lines[1:])


def test_run_failing_script_exits_1_with_a_summary(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text("raise SystemExit(3)\n")
    p = zs("run", "--standalone", "--nproc", "1", "--config", "configs/zero2.json", str(script))
    assert p.returncode == 1
    assert p.stderr.splitlines()[-1] == (
        "zeroshard run: error: training failed: rank 0 exited with code 3 (its output is above)"
    )


def test_run_splits_our_torchrun_and_script_options():
    from zeroshard.cli.run import split_argv, world_size

    mine, passed, rest = split_argv(
        ["--nnodes", "2", "--config=c.json", "--node-rank", "1", "--rdzv-endpoint", "h:29500",
         "--nproc", "4", "--standalone", "train.py", "--config", "x", "--nproc", "9"]
    )  # fmt: skip
    assert mine == {"config": "c.json", "nproc": "4"}
    assert passed == ["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "h:29500",
                      "--standalone"]  # fmt: skip
    assert rest == ["train.py", "--config", "x", "--nproc", "9"]
    assert world_size("4", passed) == 8


def test_initialize_without_config_says_how(monkeypatch):
    monkeypatch.delenv("ZEROSHARD_CONFIG", raising=False)
    with pytest.raises(zeroshard.ConfigError, match="zeroshard run --config CFG"):
        zeroshard.initialize(torch.nn.Linear(2, 2))


# -- estimate -----------------------------------------------------------------------------------
def test_estimate_7b_on_8_ranks_prints_the_zero_paper(capsys):
    """Ψ = 7e9, N = 8, mixed-precision Adam (fp16 params and grads, fp32 master, m, v)."""
    argv = ["estimate", "--params", "7e9", "--world-size", "8", "--precision", "fp16",
            "--optimizer", "adam", "--device-memory", "40GB"]  # fmt: skip
    rc, out, _ = cli(capsys, *argv, "--json")
    assert rc == 0
    stages = json.loads(out)["stages"]
    assert [s["bytes"]["total"] for s in stages] == [112_000_000_000, 38_500_000_000,
                                                     26_250_000_000, 14_000_000_000]  # fmt: skip
    assert [s["fits"] for s in stages] == [False, True, True, True]
    s3 = stages[3]["bytes"]
    assert (s3["params"], s3["grads"], s3["master"], s3["optimizer_states"]) == (
        1_750_000_000, 1_750_000_000, 3_500_000_000, 7_000_000_000)  # fmt: skip
    rc, out, _ = cli(capsys, *argv)
    row3 = next(ln for ln in out.splitlines() if ln.split()[:1] == ["3"])
    assert "14.00 GB" in row3 and row3.split()[1:3] == ["1.75", "GB"]
    row0 = next(ln for ln in out.splitlines() if ln.split()[:1] == ["0"])
    assert "112.00 GB" in row0 and row0.rstrip().endswith("no")


def test_estimate_from_a_factory_matches_the_library(capsys, tmp_path):
    """`example_input` next to the factory (tests/models.py has one) is what stage 3 is
    traced on; without one (ReusedBlock's module has none) the engine runs on token ids
    synthesized from its embedding, and a note says so."""
    from tests.models import example_input, make_model
    from zeroshard.estimate.model_states import estimate

    rc, out, _ = cli(capsys, "estimate", "--model", "tests.models:make_model", "--nodes", "2",
                     "--gpus-per-node", "2", "--config", "configs/zero3.json",
                     "--json")  # fmt: skip
    assert rc == 0
    got = json.loads(out)
    with torch.device("meta"):
        model = make_model()
    want = estimate(model, world_size=4, config="configs/zero3.json",
                    example_input=example_input())  # fmt: skip
    assert got["world_size"] == 4
    assert [s["bytes"] for s in got["stages"]] == [e.bytes for e in want]
    # zero3.json's persistence threshold (10000) keeps every unit of this model whole
    assert got["stages"][3]["gathered_peak"] == want[3].gathered_peak == 0
    assert got["stages"][3]["schedule"] == want[3].schedule == "traced"
    # a config where blocks are sharded: the reused block's peak is traced with the input
    cfg = tmp_path / "z3.json"
    cfg.write_text(json.dumps({"zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 300, "reduce_bucket_size": 700,
        "stage3_prefetch_bucket_size": 2500}}))
    argv = ["estimate", "--model", "tests.models_stage3:ReusedBlock", "--world-size", "2",
            "--config", str(cfg), "--stage", "3"]  # fmt: skip
    rc, out, _ = cli(capsys, *argv, "--example-input", "tests.models:example_input", "--json")
    traced = json.loads(out)["stages"][0]
    assert rc == 0 and traced["schedule"] == "traced"
    rc, out, _ = cli(capsys, *argv, "--json")
    synth = json.loads(out)["stages"][0]
    assert synth["schedule"] == "synthesized input: token ids of shape (1, 8) for Embedding"
    assert synth["gathered_peak"] == traced["gathered_peak"]
    rc, out, _ = cli(capsys, *argv)
    assert out.splitlines()[-1] == (
        "note: no example input: stage 3 gathered peak and sent/step traced on token ids of "
        "shape (1, 8) for Embedding; give --example-input if the forward takes something else")


def test_estimate_from_a_hugging_face_config(capsys, tmp_path):
    from zeroshard.estimate.model_states import estimate

    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64)
    cfg.save_pretrained(tmp_path)
    zcfg = tmp_path / "z3.json"  # blocks sharded, small prefetch: a gathered peak to trace
    zcfg.write_text(json.dumps({"zero_optimization": {
        "stage3_param_persistence_threshold": 1000, "stage3_prefetch_bucket_size": 10000}}))
    rc, out, _ = cli(capsys, "estimate", "--hf-config", str(tmp_path / "config.json"),
                     "--world-size", "2", "--precision", "bf16", "--config", str(zcfg),
                     "--json")  # fmt: skip
    assert rc == 0
    got = json.loads(out)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    numel = sum(p.numel() for p in model.parameters())  # the tied lm_head counted once
    assert got["trainable_params"] == numel
    # stage 0 (bf16 params, fp32 grads, fp32 master, 2 Adam states), padding included
    s0 = got["stages"][0]["bytes"]
    assert numel * 2 <= s0["params"] <= numel * 2 * 1.01
    assert s0["optimizer_states"] == 8 * s0["params"] // 2
    # stage 3 is traced on 8 token ids: the engine's peak on the meta model
    ids = {"input_ids": torch.zeros(1, 8, dtype=torch.long)}
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    want = estimate(model, world_size=2, precision="bf16", config=str(zcfg), stages=(3,),
                    example_input=ids)[0]  # fmt: skip
    s3 = got["stages"][3]
    assert s3["schedule"] == want.schedule == "traced"
    assert s3["gathered_peak"] == want.gathered_peak > 0
    assert s3["comm_bytes"] == want.comm_bytes


def test_estimate_errors_are_one_line(capsys):
    rc, out, err = cli(capsys, "estimate", "--params", "7e9")
    assert rc == 2 and err == "zeroshard estimate: error: give --world-size N (or --nodes and " \
        "--gpus-per-node)\n"  # fmt: skip
    rc, _, err = cli(capsys, "estimate", "--params", "7e9", "--world-size", "8",
                     "--device-memory", "80 jigabytes")  # fmt: skip
    assert rc == 2 and err.count("\n") == 1 and "cannot read '80 jigabytes' as a size" in err
    rc, _, err = cli(capsys, "estimate", "--model", "tests.models:make_model", "--world-size",
                     "2", "--example-input", "tests.models:loss_fn")  # fmt: skip
    assert rc == 2 and err == (
        "zeroshard estimate: error: the example input (tests.models.loss_fn) failed: TypeError: "
        "loss_fn() missing 2 required positional arguments: 'x' and 'y'\n")


# -- check-config -------------------------------------------------------------------------------
def test_check_config_lists_used_resolved_no_effect(capsys, tmp_path):
    cfg = {
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 3, "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": "auto",
                              "contiguous_gradients": True, "reduce_bucket_size": 100,
                              "allgather_bucket_size": 100},
    }  # fmt: skip
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    rc, out, _ = cli(capsys, "check-config", str(path), "--world-size", "4",
                     "--hidden-size", "100")  # fmt: skip
    assert rc == 0
    rows = {ln[14:].split()[0]: ln for ln in out.splitlines()[:-1]}
    assert rows["train_batch_size"].startswith("resolved") and "-> 24" in rows["train_batch_size"]
    assert "-> 9000" in rows["zero_optimization.stage3_prefetch_bucket_size"]
    assert rows["zero_optimization.contiguous_gradients"].startswith("no effect")
    # at stage 3 a given reduce_bucket_size bounds each unit's buckets (as the runtime does)
    assert rows["zero_optimization.reduce_bucket_size"].startswith("used")
    assert rows["zero_optimization.allgather_bucket_size"].startswith("no effect")
    assert rows["bf16.enabled"].startswith("used")
    assert out.splitlines()[-1] == f"{path}: usable (world size 4)"


def test_check_config_refuses_with_reasons(capsys, tmp_path):
    cfg = {"tensorboard": {"enabled": True}, "zero_optimization": {"stage": 2,
           "reduce_scatter": False}, "gradient_clipping": 1.0}  # fmt: skip
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    rc, out, _ = cli(capsys, "check-config", str(path))
    assert rc == 1
    lines = out.splitlines()
    refused = [ln for ln in lines if ln.startswith("refused")]
    assert any("tensorboard.enabled" in ln for ln in refused), out
    assert any(ln.startswith("used") and "gradient_clipping" in ln for ln in lines)
    # all at once: the schema's refusal and initialize's own (reduce_scatter false)
    assert any(ln.startswith("refused") and "reduce_scatter" in ln for ln in lines), out
    assert lines[-1].endswith("NOT usable: 2 problems (world size 1)"), out
    # initialize's own refusals (valid schema, unsupported value) are listed too
    cfg = {"zero_optimization": {"stage": 2, "reduce_scatter": False}}
    path.write_text(json.dumps(cfg))
    rc, out, _ = cli(capsys, "check-config", str(path))
    assert rc == 1
    line = next(ln for ln in out.splitlines() if "reduce_scatter" in ln)
    assert line.startswith("refused") and "not supported by zeroshard" in line


def test_check_config_missing_file_one_line(capsys, tmp_path):
    rc, out, err = cli(capsys, "check-config", str(tmp_path / "x.json"))
    assert rc == 2 and out == ""
    assert err == f"zeroshard check-config: error: invalid zeroshard config: config file not " \
        f"found: {tmp_path / 'x.json'}\n"  # fmt: skip


# -- consolidate --------------------------------------------------------------------------------
def test_consolidate_without_the_library_function_says_so(capsys, monkeypatch):
    monkeypatch.delattr(zeroshard, "consolidate", raising=False)
    rc, _, err = cli(capsys, "consolidate", "ckpt", "out")
    assert rc == 2 and err.count("\n") == 1 and "has no zeroshard.consolidate" in err


def test_consolidate_writes_the_full_model(capsys, tmp_path):
    from safetensors.torch import load_file

    from tests.models import make_model

    model = make_model()
    model, opt = zeroshard.initialize(model, {"zero_optimization": {"stage": 2}})
    ckpt = zeroshard.save_checkpoint(tmp_path / "ckpt", model, opt)
    rc, out, err = cli(capsys, "consolidate", str(ckpt), str(tmp_path / "out"),
                       "--dtype", "fp32", "--max-shard-size", "20KB")  # fmt: skip
    assert rc == 0, err
    files = sorted((tmp_path / "out").glob("*.safetensors"))
    assert len(files) > 1  # 20KB shards of a ~55KB model
    got: dict = {}
    for f in files:
        got.update(load_file(f))
    params = dict(model.named_parameters(remove_duplicate=False))
    for k, v in model.state_dict().items():
        if k not in got:  # a tied weight is written once, under its first name (as HF does)
            alias = [n for n in got if params.get(n) is not None and params[n] is params.get(k)]
            assert alias, f"{k} is neither written nor tied to a written tensor"
            k = alias[0]
        assert torch.equal(got[k].float(), v.float()), k


# -- env and help -------------------------------------------------------------------------------
def test_env_reports_versions_and_kernel_choice(capsys):
    from zeroshard.update import apply as update

    rc, out, _ = cli(capsys, "env", "--json")
    assert rc == 0
    info = json.loads(out)
    assert info["torch"] == torch.__version__ and info["zeroshard"] == zeroshard.__version__
    assert info["backends"]["gloo"] is True
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert info["update_kernel"] == update.resolve_backend("auto", dev)
    if not torch.cuda.is_available():
        assert info["update_kernel"] == "torch" and info["devices"] == []


@pytest.mark.parametrize("sub", list(SUBCOMMANDS))
def test_every_subcommand_help_has_an_example(capsys, sub):
    try:
        rc = main([sub, "--help"])
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr().out
    assert rc == 0
    assert "example" in out and f"zeroshard {sub} " in out.split("example", 1)[1]


def test_setup_declares_the_console_script():
    text = (ROOT / "setup.py").read_text()
    assert '"zeroshard=zeroshard.cli.main:main"' in text and "zeroshard-train=" in text
    from setuptools import find_packages

    assert 'find_packages(include=["zeroshard", "zeroshard.*"])' in text
    assert "zeroshard.cli" in find_packages(str(ROOT), include=["zeroshard", "zeroshard.*"])

"""`make gpu-check` (bench/gpu_check.py): without CUDA it says so and exits 0; its figures
come from formulas checked here against data-sheet numbers; its nccl section's worker
(bench/gpu_nccl.py) runs here on CPU with gloo, under torchrun, as it would with nccl."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check as G  # noqa: E402
import gpu_nccl as N  # noqa: E402


def test_make_gpu_check_without_cuda_says_so_and_exits_0(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = tmp_path / "gc"
    proc = subprocess.run(["make", "-s", "gpu-check", f"PY={sys.executable}",
                           f"GPU_CHECK_ARGS=--out {out}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "gpu-check: no CUDA device here" in proc.stdout
    assert not out.with_suffix(".json").exists()


def test_peak_bandwidth_from_clock_and_bus_width():
    # H100 SXM5: HBM3 at 2619 MHz on a 5120-bit bus = 3.35 TB/s (the data sheet's figure)
    h100 = G.peak_bandwidth("NVIDIA H100 80GB HBM3", 2_619_000, 5120)
    assert h100 == pytest.approx(3.35e12, rel=1e-3)
    # A100 80GB SXM: 1593 MHz, 5120 bits = 2.039 TB/s
    assert G.peak_bandwidth("x", 1_593_000, 5120) == pytest.approx(2.039e12, rel=1e-3)
    assert G.peak_bandwidth("NVIDIA H200", None, None) == 4.8e12
    assert G.peak_bandwidth("unknown", None, None) == 0.0


def test_bytes_per_element_and_verdicts():
    assert G.bytes_per_element("adamw_fp32") == 28 == G.bytes_per_element("adamw_bf16")
    assert G.bytes_per_element("adamw8bit") == 16 + 16 / 256
    row = {"kind": "adamw_fp32", "log2_n": 26, "fraction_of_peak": 0.85}
    off = {"ratio": 1.3, "copies_in_backward": 40, "copies_in_step": 0}
    res = {"kernel_tests": {"passed": 78, "failed": 0}, "bandwidth": [row],
           "parity": [{"ok": True}], "offload": [off], "nccl": [{"ok": True}]}  # fmt: skip
    v = G.verdicts(res)
    assert list(v.values()) == [True, True, True, False, True, True]
    assert G.exit_status(v) == 0  # a missed performance target is reported, not fatal
    off["copies_in_step"] = 3  # copies left to step(): the overlap did not happen
    assert G.verdicts(res)["offload copies gradients during backward"] is False
    res["nccl"] = [{"ok": True}, {"world": 2, "ok": False}]
    assert G.exit_status(G.verdicts(res)) == 1
    assert G.exit_status(G.verdicts({})) == 0  # sections not run are not failures
    row["fraction_of_peak"] = 0.79
    assert G.verdicts(res)["update >= 80% of peak at 2^26+"] is False
    assert set(G.verdicts({}).values()) == {None}
    assert G.parse_pytest_summary("75 passed, 2 failed, 1 skipped, 1 error in 3.1s") == {
        "passed": 75, "failed": 2, "skipped": 1, "errors": 1}


def test_sections_are_chosen_by_name_and_a_bad_one_is_refused(capsys):
    assert G.parse_args(["--only", "nccl, offload"]).only == ["nccl", "offload"]
    assert G.parse_args([]).only == list(G.SECTIONS)
    with pytest.raises(SystemExit):
        G.parse_args(["--only", "nccl,ncl"])
    assert "unknown or no sections ['ncl']; choose from kernels, bandwidth" in (
        capsys.readouterr().err)


def test_nccl_and_offload_sections_skip_without_cuda(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(G.torch.cuda, "is_available", lambda: False)
    assert G.main(["--only", "offload,nccl", "--out", str(tmp_path / "gc")]) == 0
    assert "no CUDA device here" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())
    assert N.main([str(tmp_path / "w.json")]) == 0  # the worker alone, as torchrun runs it
    assert "gpu-check nccl: no CUDA device here" in capsys.readouterr().out
    assert not (tmp_path / "w.json").exists()


def test_nccl_worlds_and_command():
    assert [N.nccl_worlds(n) for n in (0, 1, 2, 3, 8)] == [[1], [1], [1, 2], [1, 3], [1, 4]]
    cmd = N.torchrun_cmd(2, Path("o.json"), 3)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert cmd[5].endswith("bench/gpu_nccl.py") and cmd[6:] == ["o.json", "--steps", "3"]


def _stages_job(steps: int) -> list[dict]:
    return N.check_stages(N.torch.device("cpu"), steps)


def test_nccl_section_stages_on_two_cpu_ranks(dist_run):
    """What the nccl section runs on each torchrun rank once its group is up, here on two gloo
    ranks: stages 0-3 match torch.optim.AdamW on the whole batch."""
    for rows in dist_run(2, _stages_job, 2):
        assert [(r["world"], r["stage"], r["backend"]) for r in rows] == [
            (2, s, "gloo") for s in range(4)]
        for r in rows:
            assert r["ok"] and r["max_rel_loss_diff"] <= N.TOLERANCE and len(r["losses"]) == 2

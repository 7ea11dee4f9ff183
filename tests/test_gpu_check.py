"""`make gpu-check` (bench/gpu_check.py): without CUDA it says so and exits 0; its figures
come from formulas checked here against data-sheet numbers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check as G  # noqa: E402


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
    res = {"kernel_tests": {"passed": 78, "failed": 0}, "bandwidth": [row],
           "parity": [{"ok": True}], "offload": [{"ratio": 1.3}]}  # fmt: skip
    v = G.verdicts(res)
    assert list(v.values()) == [True, True, True, False]
    row["fraction_of_peak"] = 0.79
    assert G.verdicts(res)["update >= 80% of peak at 2^26+"] is False
    assert set(G.verdicts({}).values()) == {None}
    assert G.parse_pytest_summary("75 passed, 2 failed, 1 skipped, 1 error in 3.1s") == {
        "passed": 75, "failed": 2, "skipped": 1, "errors": 1}

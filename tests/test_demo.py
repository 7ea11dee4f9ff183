"""The README's main job runs: 2 CPU ranks under torchrun, loss falls, memory lines match the
ZeRO formula that the demo prints beside them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_demo_trains_on_two_ranks():
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "zeroshard.train", "--config", str(REPO / "configs" / "zero2.json"),
        "--steps", "20", "--layers", "2", "--dim", "64",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"step +\d+ \| loss ([0-9.]+)", out.stdout)]
    assert len(losses) == 2 and losses[-1] < losses[0] - 0.2, out.stdout
    mem = re.findall(
        r"rank (\d) MiB: params ([0-9.]+) grads ([0-9.]+) master ([0-9.]+) "
        r"optimizer_states ([0-9.]+) .*ZeRO formula: ([0-9.]+) ([0-9.]+) ([0-9.]+) ([0-9.]+)",
        out.stdout,
    )
    assert {m[0] for m in mem} == {"0", "1"}
    for m in mem:
        held, formula = [float(v) for v in m[1:5]], [float(v) for v in m[5:9]]
        for h, f in zip(held, formula):
            assert abs(h - f) <= 0.02 + 0.01 * f, (m, out.stdout)

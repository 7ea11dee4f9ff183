"""Two torchrun agents acting as two nodes (c10d rendezvous on 127.0.0.1), stages 2 and 3:
training matches single-process AdamW, and a save/resume across the two nodes is exact."""

import subprocess
import sys

import numpy as np
import pytest

from tests.integrations.launch import ROOT, SCRIPTS, env, free_port, read_json


def _agents(tmp_path) -> dict:
    port, out = free_port(), tmp_path / "multinode.json"
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc_per_node", "1", "--node_rank", str(node), "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "zs",
               str(SCRIPTS / "multinode_run.py"), str(out), str(tmp_path / "ckpt")]  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))  # fmt: skip
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        if p.returncode != 0:
            pytest.fail(f"torchrun agent exited {p.returncode}:\n{log[-4000:]}")
    return read_json(out)


def test_two_nodes_train_save_and_resume(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    import tiny_task

    r = _agents(tmp_path)
    assert r["world"] == 2 and r["node_rank"] == 0
    ref = tiny_task.adamw_reference(10)
    for stage in ("stage2", "stage3"):
        np.testing.assert_allclose(r[stage]["losses"], ref, rtol=1e-5)
        assert r[stage]["resumed"] == r[stage]["losses"][5:]

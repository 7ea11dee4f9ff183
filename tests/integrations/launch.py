"""Helpers for the framework tests: run a script under torchrun (or plain python) as a
subprocess with this checkout first on PYTHONPATH, and read the JSON it writes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "tests" / "scripts"


def require(*modules: str) -> None:
    """Skip the test when an optional framework is not installed."""
    for m in modules:
        pytest.importorskip(m)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e.setdefault("OMP_NUM_THREADS", "1")
    e.setdefault("TOKENIZERS_PARALLELISM", "false")
    e.setdefault("HF_HUB_OFFLINE", "1")
    e.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    return e


def run(cmd: list[str], timeout: int = 600, extra_env: dict | None = None) -> str:
    """Run `cmd`; on failure the test fails with the command's output tail."""
    p = subprocess.run(
        cmd, cwd=ROOT, env={**env(), **(extra_env or {})}, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    out = p.stdout + p.stderr
    if p.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {p.returncode}:\n{out[-6000:]}")
    return out


def torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 600) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(SCRIPTS / script), *args]  # fmt: skip
    return run(cmd, timeout)


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)

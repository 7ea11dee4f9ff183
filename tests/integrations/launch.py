"""Helpers for the framework tests: run a script under torchrun (or plain python) as a
subprocess, and read the JSON it writes. The subprocess finds zeroshard through its editable
install (`make install`), not through PYTHONPATH: with the checkout's root on the path, its
kernels/ (installed as `zeroshard_kernels`) would shadow PyPI's `kernels`, which transformers
imports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
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
    kept = [p for p in e.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p) != ROOT]
    e["PYTHONPATH"] = os.pathsep.join(kept)
    e.setdefault("OMP_NUM_THREADS", "1")
    e.setdefault("TOKENIZERS_PARALLELISM", "false")
    e.setdefault("HF_HUB_OFFLINE", "1")
    # A hung run is killed with SIGABRT first, so every Python process prints its stacks.
    e["PYTHONFAULTHANDLER"] = "1"
    e.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    return e


class Hung(Exception):
    """A launched command ran past its timeout; carries every process's stacks."""


def run(cmd: list[str], timeout: int = 600, extra_env: dict | None = None) -> str:
    """Run `cmd`; on failure the test fails with the command's output tail. A run past
    `timeout` raises `Hung` (a pytest failure unless caught) once every process under it
    (torchrun's ranks, in sessions of their own, and their data-loader workers included)
    has printed its stacks and been killed, so no rank outlives the test."""
    p = subprocess.Popen(
        cmd, cwd=ROOT, env={**env(), **(extra_env or {})}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = [p.pid, *_descendants(p.pid)]
        # faulthandler prints each process's stacks, then it dies
        _signal(reversed(tree), signal.SIGABRT, pause=0.5)
        try:
            out, _ = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            out = ""
        _signal(tree, signal.SIGKILL)
        p.kill()
        rest, _ = p.communicate()
        raise Hung(f"{' '.join(cmd)} ran past {timeout} s; its stacks:\n"
                   f"{(out + (rest or ''))[-12000:]}") from None  # fmt: skip
    if p.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {p.returncode}:\n{out[-6000:]}")
    return out


def _descendants(pid: int) -> list[int]:
    """Every live process below `pid`, read from /proc (children before grandchildren)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [c for c, par in parent.items() if par in frontier]
        found += kids
        frontier = kids
    return found


def _signal(pids, sig: int, pause: float = 0.0) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        time.sleep(pause)  # one process's stacks at a time, not interleaved


def torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 600,
             reference: bool = False) -> str:
    """Run tests/scripts/`script` on `nproc` ranks. A `reference` run (real DeepSpeed, whose
    data loader forks workers from a process with gloo threads, a fork that can deadlock in
    the child) is retried once if it hangs, its stacks printed; any other hang fails."""
    tries = 2 if reference else 1
    while True:
        tries -= 1
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(SCRIPTS / script), *args]  # fmt: skip
        try:
            return run(cmd, timeout)
        except Hung as hung:
            if not tries:
                pytest.fail(str(hung))
            print(f"the reference run hung; retrying once:\n{hung}")


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)

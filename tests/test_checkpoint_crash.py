"""SIGKILL of one rank or of all ranks at every event inside a save: a new tag, a re-save of
the tag `latest` names, a re-save of another tag, sync and async. Afterwards `latest` names a
complete checkpoint holding exactly the weights of the last save that reached `latest`;
the next save (here on one process) puts back every tag a crash left without its folder, so
each tag loads to the weights of its last complete copy; and no leftover stays.

The committed cases are a representative subset; ZEROSHARD_CRASH_MATRIX=full runs every
(sequence, point, victim) that fires, sync and async (42 trials)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

import zeroshard
from tests.ckpt_jobs import REPO, build, train
from tests.ckpt_jobs import free_port as _port

# points that fire on the publishing rank only (rank 0 on a shared disk)
LEADER = ("before_publish", "after_latest_tmp", "after_old_moved", "during_link",
          "after_rename", "after_publish")  # fmt: skip
POINTS = {  # the points each sequence's last save passes through
    "a,b": ("after_write", "before_publish", "after_rename", "after_publish"),
    "a,a": ("after_write",) + LEADER,
    "a,b,a": ("after_write", "before_publish", "after_old_moved", "after_rename",
              "after_publish"),
}  # fmt: skip


def _matrix() -> list[tuple[str, str | None, str | None, str]]:
    out = []
    for seq, points in POINTS.items():
        for point in points:
            for who in ("0", "1", "all") if point == "after_write" else ("0", "all"):
                out.append((seq, point, who, "sync"))
    out += [("a,a", p, "all", "async") for p in POINTS["a,a"]]
    return out


SUBSET = [
    ("a,b", "after_write", "1", "sync"),
    ("a,b", "before_publish", "all", "sync"),
    ("a,a", "after_latest_tmp", "all", "sync"),
    ("a,a", "after_old_moved", "all", "sync"),  # the re-saved tag has no folder for a while
    ("a,b,a", "after_old_moved", "0", "sync"),
    ("a,a", "during_link", "all", "async"),
    ("a,a", None, None, "sync"),  # no crash: the re-save completes
]
CASES = _matrix() if os.environ.get("ZEROSHARD_CRASH_MATRIX") == "full" else SUBSET


def _launch(root: Path, seq: str, point: str | None, who: str | None, mode: str) -> list:
    port = _port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")  # fmt: skip
        env.pop("ZEROSHARD_CKPT_CRASH", None)
        crash = f"{point}:{who}" if point else "-"
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.ckpt_crash_worker", str(root), seq, crash, mode],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        ))  # fmt: skip
    return procs


def _reap(procs: list, crash: bool, who: str | None) -> list[int]:
    """Wait for the run; after a crash, SIGKILL the survivors stuck in a collective."""
    deadline = time.time() + 900  # a loaded 2-core CI box is slow to start 14 processes
    victims = [0, 1] if who == "all" else [int(who)] if who else []
    while time.time() < deadline:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            break
        if crash and all(codes[v] is not None for v in victims):
            time.sleep(1.0)  # survivors finish what they can, then block in the vote
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    return [p.returncode for p in procs]


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    runs = []
    for i in range(0, len(CASES), 7):  # seven 2-rank runs at once
        batch = []
        for seq, point, who, mode in CASES[i : i + 7]:
            root = tmp_path_factory.mktemp("crash") / "ckpt"
            root.mkdir()
            batch.append((root, seq, point, who, mode, _launch(root, seq, point, who, mode)))
        for root, seq, point, who, mode, procs in batch:
            runs.append((root, seq, point, who, mode, _reap(procs, point is not None, who)))
    return runs


def _expected(seq: str, point: str | None) -> tuple[int, dict[str, set[int]]]:
    """(step `latest` must hold, {tag: steps its folder may hold after the next save})."""
    tags = seq.split(",")
    last, step = tags[-1], 2 * len(tags)
    done = {t: 2 * (k + 1) for k, t in enumerate(tags[:-1])}  # last complete save per tag
    resave_latest = last == tags[-2]
    moved = point in (None, "after_publish") or (
        resave_latest and point in ("after_latest_tmp", "after_old_moved", "during_link",
                                    "after_rename"))  # fmt: skip
    versions = {t: {s} for t, s in done.items()}
    if point is None or point != "after_write" and point != "before_publish":
        versions.setdefault(last, set()).add(step)  # the crashed save's copy was complete
    if point == "before_publish" and last in done:
        versions[last].add(step)
    return (step if moved else 2 * (len(tags) - 1)), versions


@pytest.mark.parametrize("case", range(len(CASES)))
def test_no_complete_copy_lost_to_sigkill(crashed, case):
    root, seq, point, who, mode, codes = crashed[case]
    if point is None:
        assert codes == [0, 0]
    else:
        assert -9 in codes, codes  # the crash happened
    latest_step, versions = _expected(seq, point)
    latest = (root / "latest").read_text()
    model, opt = build(0, "fp32", seed=3)
    folder, client = zeroshard.load_checkpoint(root, model, opt)
    assert folder.name == latest
    step = client["step"]
    assert step == latest_step, (seq, point, who, mode, latest)
    ref = safetensors.torch.load_file(str(root.parent / f"ref{step}.safetensors"))
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), ref[n]), (point, n)
    losses = train(model, opt, step, 1)
    assert losses[0] == losses[0] and losses[0] < 30
    zeroshard.save_checkpoint(root, model, opt, tag="next")  # sweeps what the crash left
    left = sorted(p.name for p in root.iterdir() if p.name.startswith("."))
    assert left == [], left
    found = {}
    for tag, allowed in versions.items():
        m, _ = build(0, "fp32", seed=4)
        _, c = zeroshard.load_checkpoint(root, m, tag=tag)
        ref = safetensors.torch.load_file(str(root.parent / f"ref{c['step']}.safetensors"))
        assert c["step"] in allowed, (tag, c["step"], allowed)
        assert all(torch.equal(p.detach(), ref[n]) for n, p in m.named_parameters()), tag
        found[tag] = c["step"]
    print(f"crash {point}:{who} ({mode}) in the last save of {seq}: latest={latest!r} "
          f"step {step}; tags after the next save: {found}")


def test_tags_are_names_and_odd_leftovers_do_not_block(tmp_path):
    model, opt = build(1, "fp32")
    for bad in ("../x", "/tmp/x", "a/b", "..", "latest", ".hidden", ""):
        with pytest.raises(zeroshard.CheckpointError, match="is not a checkpoint tag"):
            zeroshard.save_checkpoint(tmp_path, model, opt, tag=bad)
    assert not (tmp_path.parent / "x").exists()
    zeroshard.save_checkpoint(tmp_path, model, opt, tag="a")
    for odd in (".old--1234", ".tmp-a-0badc0ffee00", ".link-a-0badc0ffee00"):
        (tmp_path / odd).mkdir()  # not restorable: no tag name, or incomplete
    zeroshard.save_checkpoint(tmp_path, model, opt, tag="b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "latest"]

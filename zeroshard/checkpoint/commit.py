"""Crash-safe publication of a checkpoint folder, with or without a shared filesystem.

Protocol (every rank):
1. write its files into `root/.tmp-<tag>-<id>/` (created by each rank: no rank relies on
   another's folder), fsync each file;
2. vote (all_reduce of an error flag): any failure -> every rank raises, nothing published;
3. all ranks exchange their file lists (name, size, sha256); on each filesystem the lowest
   rank that sees files in the folder (the "leader": rank 0 on a shared disk, one per node on
   node-local disks) writes `manifest.json`, fsyncs the folder and publishes it;
4. publish: a new tag is renamed into place, then `latest` is replaced atomically. A tag that
   already exists is replaced without a window: `latest` first names the complete temporary
   folder, the old copy is moved aside, a hard-linked copy of the new files is renamed to
   `<tag>`, `latest` names `<tag>` again, then the old copy and temporary folder go;
5. a second vote; the next save removes leftovers of crashed saves (never the folder
   `latest` names).
At every instant `latest` names a complete checkpoint folder.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zeroshard.checkpoint import dist_util
from zeroshard.checkpoint.st_stream import fsync_dir

LATEST = "latest"
MANIFEST = "manifest.json"
TMP, OLD, LINK = ".tmp-", ".old-", ".link-"


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded; the message names the file and fault."""


def write_atomic(path: Path, text: str) -> None:
    """Write tmp, fsync, rename over `path`, fsync the folder."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_latest(root: Path) -> str | None:
    p = root / LATEST
    return p.read_text().strip() if p.exists() else None


def clean_stale(root: Path, keep: str) -> None:
    """Remove temporary folders of crashed saves (not `keep`, not what `latest` names)."""
    latest = read_latest(root)
    for p in root.iterdir() if root.exists() else []:
        if p.name.startswith((TMP, OLD, LINK)) and keep not in p.name and p.name != latest:
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
            p.unlink(missing_ok=True)


def _link_copy(src: Path, dst: Path) -> None:
    dst.mkdir()
    for f in src.iterdir():
        try:
            os.link(f, dst / f.name)
        except OSError:  # no hard links on this filesystem: copy
            shutil.copy2(f, dst / f.name)
            with open(dst / f.name, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(dst)


def _publish(root: Path, tag: str, tmp: Path, sid: str) -> None:
    final = root / tag
    if not final.exists():
        os.replace(tmp, final)
        fsync_dir(root)
        dist_util.crash_point("after_rename")
        write_atomic(root / LATEST, tag)
        return
    if read_latest(root) == tag:
        write_atomic(root / LATEST, tmp.name)  # the complete new copy
    dist_util.crash_point("after_latest_tmp")
    old = root / f"{OLD}{tag}-{sid}"
    os.replace(final, old)
    fsync_dir(root)
    dist_util.crash_point("after_old_moved")
    link = root / f"{LINK}{tag}-{sid}"
    _link_copy(tmp, link)
    os.replace(link, final)
    fsync_dir(root)
    dist_util.crash_point("after_rename")
    write_atomic(root / LATEST, tag)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)


def commit(
    root: Path,
    tag: str,
    write_files: Callable[[Path], dict[str, Any]],
    make_manifest: Callable[[list[dict[str, Any]]], str],
    pg: Any = None,
) -> Path:
    """Run the protocol above. `write_files(folder)` writes this rank's files and returns its
    part ({"files": {name: {...}}, ...}); `make_manifest(parts)` renders manifest.json."""
    rank, _ = dist_util.rank_world()
    sid = dist_util.broadcast_obj(uuid.uuid4().hex[:12], pg)
    tmp = root / f"{TMP}{tag}-{sid}"
    error: BaseException | None = None
    part: dict[str, Any] = {}
    try:
        root.mkdir(parents=True, exist_ok=True)
        clean_stale(root, keep=sid)
        tmp.mkdir(exist_ok=True)
        part = write_files(tmp)
        dist_util.crash_point("after_write")
    except BaseException as e:  # reported to every rank by the vote, then re-raised
        error = e
    if not dist_util.all_ok(error is None, pg):
        shutil.rmtree(tmp, ignore_errors=True)
        where = f"rank {rank}: {error!r}" if error else "another rank failed"
        raise CheckpointError(
            f"checkpoint save to {root / tag} failed ({where}); the previous checkpoint is "
            "untouched"
        ) from error
    parts = dist_util.all_gather_obj(part, pg)
    try:
        visible = [r for r, p in enumerate(parts) if all((tmp / f).exists() for f in p["files"])]
        if visible and visible[0] == rank:
            write_atomic(tmp / MANIFEST, make_manifest(parts))
            dist_util.crash_point("before_publish")
            _publish(root, tag, tmp, sid)
            clean_stale(root, keep=sid)  # `latest` moved on: earlier crashes' leftovers go
            dist_util.crash_point("after_publish")
    except BaseException as e:
        error = e
    if not dist_util.all_ok(error is None, pg):
        where = f"rank {rank}: {error!r}" if error else "another rank failed"
        raise CheckpointError(f"publishing checkpoint {root / tag} failed ({where})") from error
    return root / tag

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
5. a second vote. Each save first (rank 0) and after publishing (each leader) runs `sweep`:
   it finishes or undoes a swap that a crash interrupted, then removes other leftovers.
At every instant `latest` names a complete checkpoint folder, and every published tag has a
complete copy that the next save's `sweep` puts back under its name.
"""

from __future__ import annotations

import os
import shutil
import stat
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zeroshard.checkpoint import dist_util
from zeroshard.checkpoint.dist_util import CheckpointError
from zeroshard.checkpoint.st_stream import fsync_dir

LATEST = "latest"
MANIFEST = "manifest.json"
TMP, OLD, LINK = ".tmp-", ".old-", ".link-"
__all__ = ["CheckpointError", "check_name", "commit", "read_latest", "sweep", "write_atomic"]


def write_atomic(path: Path, text: str) -> None:
    """Write tmp, fsync, rename over `path`, fsync the folder."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def check_name(name: Any, what: str, leftover_ok: bool = False) -> str:
    """`name` if it names an entry directly inside the checkpoint root, else ValueError.

    Tags and `latest` are names, never paths: no separator, no `..`, nothing absolute.
    Names starting with "." are this module's temporary folders (`latest` may name one
    while a tag is re-saved: `leftover_ok`); a tag cannot be `latest` itself."""
    bad = (not isinstance(name, str) or name in ("", ".", "..", LATEST) or len(name) > 255
           or any(c in name for c in ("/", "\\", "\0")) or name != name.strip()
           or (name.startswith(".") and not (leftover_ok and name.startswith(TMP))))  # fmt: skip
    if bad:
        raise ValueError(
            f"{what} {name!r} is not a checkpoint tag: tags are names inside the checkpoint "
            "folder (no '/', '..', absolute paths, leading '.' or the name 'latest')"
        )
    return name


def read_latest(root: Path) -> str | None:
    """The tag `latest` names (None if there is none); ValueError if it is not a tag."""
    p = root / LATEST
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size > 4096:
        raise ValueError(f"{p}: not a regular file of at most 4096 bytes holding a tag")
    with open(p, "rb") as f:
        raw = f.read(4096)
    try:
        text = raw.decode().strip()
    except UnicodeDecodeError:
        raise ValueError(f"{p}: not UTF-8 text") from None
    return check_name(text, f"{p} names", leftover_ok=True)


def _latest_quiet(root: Path) -> str | None:
    try:
        return read_latest(root)
    except (ValueError, OSError):
        return None  # overwritten by the save in progress


def _leftover(name: str) -> tuple[str, str, str] | None:
    """(prefix, tag, save id) of a temporary folder's name, else None."""
    for prefix in (TMP, OLD, LINK):
        if name.startswith(prefix) and "-" in name[len(prefix) :]:
            tag, sid = name[len(prefix) :].rsplit("-", 1)
            return prefix, tag, sid
    return None


def _is_tag(name: str) -> bool:
    try:
        return check_name(name, "tag") == name
    except ValueError:
        return False


def _complete(folder: Path) -> bool:
    return (folder / MANIFEST).is_file() and not folder.is_symlink()


def sweep(root: Path, keep: str) -> None:
    """Finish or undo what crashed saves left, then remove the leftovers nobody needs.

    1. `latest` names a temporary folder (a re-save crashed mid-swap): finish that swap.
    2. A tag's folder is missing while `.old-<tag>-<id>` exists (the swap crashed between its
       renames): put back the newest complete copy (that save's complete temporary folder,
       else the old copy).
    3. Remove every other leftover except the save in progress (`keep`). A tag's only
    complete copy is never removed: steps 1 and 2 put it in place first."""
    if not root.is_dir():
        return
    latest = _latest_quiet(root)
    info = _leftover(latest) if latest else None
    if info and info[2] != keep and (root / latest).is_dir():
        _publish(root, info[1], root / latest, uuid.uuid4().hex[:12])
    for p in sorted(root.iterdir()):
        info = _leftover(p.name)
        if info is None or info[0] != OLD or info[2] == keep or not _is_tag(info[1]):
            continue
        new = root / f"{TMP}{info[1]}-{info[2]}"
        best = new if _complete(new) else p if _complete(p) else None
        if best is not None and not (root / info[1]).exists():
            os.replace(best, root / info[1])
            fsync_dir(root)
    latest = _latest_quiet(root)
    for p in root.iterdir():
        info = _leftover(p.name)
        if info is not None and info[2] != keep and p.name != latest:
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
            p.unlink(missing_ok=True)


def _link_copy(src: Path, dst: Path) -> None:
    dst.mkdir()
    for i, f in enumerate(sorted(src.iterdir())):
        try:
            os.link(f, dst / f.name)
        except OSError:  # no hard links on this filesystem: copy
            shutil.copy2(f, dst / f.name)
            with open(dst / f.name, "rb") as fh:
                os.fsync(fh.fileno())
        if i == 0:
            dist_util.crash_point("during_link")
    fsync_dir(dst)


def _publish(root: Path, tag: str, tmp: Path, sid: str) -> None:
    """Put the complete folder `tmp` in place as `<tag>` and point `latest` at it. At every
    instant `latest` names a complete folder and a complete copy of `<tag>` exists under
    `<tag>`, `latest`'s folder or `.old-<tag>-<sid>` (which `sweep` puts back)."""
    final = root / tag
    if final.exists() and _latest_quiet(root) == tag:
        write_atomic(root / LATEST, tmp.name)  # the complete new copy
        dist_util.crash_point("after_latest_tmp")
    old = root / f"{OLD}{tag}-{sid}"
    if final.exists():
        os.replace(final, old)
        fsync_dir(root)
        dist_util.crash_point("after_old_moved")
    if _latest_quiet(root) == tmp.name:  # `latest` keeps its folder until it names <tag>
        link = root / f"{LINK}{tag}-{sid}"
        _link_copy(tmp, link)
        os.replace(link, final)
    else:
        os.replace(tmp, final)
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
    rank = pg.rank if pg is not None else 0
    sid = dist_util.broadcast_obj(uuid.uuid4().hex[:12], pg)
    tmp = root / f"{TMP}{tag}-{sid}"
    error: BaseException | None = None
    part: dict[str, Any] = {}
    try:
        root.mkdir(parents=True, exist_ok=True)
        if rank == 0:  # one rank: two sweeping one folder at once would race
            sweep(root, keep=sid)
        tmp.mkdir(exist_ok=True)
        part = write_files(tmp)
        dist_util.crash_point("after_write", rank)
    except BaseException as e:  # reported to every rank by the vote, then re-raised
        error = e
    where = dist_util.faults(error, pg)
    if where:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"checkpoint save to {root / tag} failed ({where}); nothing was published, the "
            "previous checkpoint is untouched"
        ) from error
    parts = dist_util.all_gather_obj(part, pg)
    try:
        visible = [r for r, p in enumerate(parts) if all((tmp / f).exists() for f in p["files"])]
        if visible and visible[0] == rank:
            write_atomic(tmp / MANIFEST, make_manifest(parts))
            dist_util.crash_point("before_publish", rank)
            _publish(root, tag, tmp, sid)
            sweep(root, keep=sid)  # `latest` moved on: earlier crashes' leftovers go
            dist_util.crash_point("after_publish", rank)
    except BaseException as e:
        error = e
    where = dist_util.faults(error, pg)
    if where:
        raise CheckpointError(f"publishing checkpoint {root / tag} failed ({where})") from error
    return root / tag

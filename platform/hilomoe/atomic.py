"""Atomic, durable writes: a reader, a concurrent writer or a crash sees the whole old file (or
directory) or the whole new one, never half of either.

    write_atomic(path, text)                 # unique temp file beside it, fsync, rename, fsync dir
    publish_dir(tmp, target, keep=True)      # a finished temp directory moved into place

The temporary names are unique (`tempfile`), so two processes writing the same target at once
never write into each other's file; the last rename wins, and each rename is whole.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new file in `path` survive a crash (the directory's own entry)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # a file system that cannot open directories: nothing more to do
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EBADF):  # not supported here: not an error
            raise
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """fsync every file under `path`, then the directories: its content is on disk before a
    rename publishes it."""
    root = Path(path)
    for f in sorted(root.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
        fsync_dir(d)
    fsync_dir(root)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """`data` into `path` through a unique temporary file in the same directory; the temporary
    file is removed if anything fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def publish_dir(tmp: Path, target: Path, keep: bool) -> bool:
    """Move the finished directory `tmp` to `target` (same parent). If `target` exists: with
    `keep`, another writer finished first and its result stands (`tmp` is removed, returns
    False); without, `target` is replaced, moved aside first so that no reader finds it half
    deleted. Returns True when `tmp` became `target`."""
    fsync_tree(tmp)
    try:
        os.rename(tmp, target)  # fails on an existing non-empty directory: never merges
    except OSError as err:
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not target.exists():
            raise
        if keep:
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, aside / target.name)
        os.rename(tmp, target)
        shutil.rmtree(aside, ignore_errors=True)
    fsync_dir(target.parent)
    return True


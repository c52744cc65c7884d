"""Writing a directory or a file so that a reader, or a resume after a kill, sees the old version or the new one,
never half of one: the one atomic writer of checkpoints, PEFT adapter files, model conversion and metrics.

The new contents are written under a hidden temporary name beside the target and renamed over it in one
`os.replace` (atomic on POSIX within a filesystem). `durable=True` also fsyncs every file and directory written,
and the parent directory after the rename, so the new version survives a power loss too, before anything points
at it. A process killed mid-write leaves only the hidden temporary, which is never read.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file and directory under `path` (deepest first), then `path` itself: file contents and the
    directory entries naming them are on disk before anything points at them."""
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


def write_dir(path: str | Path, fill, *, prefix: str | None = None, durable: bool = True) -> Path:
    """`fill(tmp)` writes the directory's files into a new hidden temp dir beside `path` (named `prefix` + random,
    default `.tmp-<name>-`), which then replaces `path`. An existing `path` is renamed aside first and removed
    after, so at every moment `path` is the old directory or the new one. If `fill` raises, the temp dir is
    removed and `path` is untouched. Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f".tmp-{path.name}-", dir=path.parent))
    try:
        fill(tmp)
        if durable:
            fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = tmp.with_name(tmp.name + ".old")
        os.replace(path, old)
    os.replace(tmp, path)
    if durable:
        fsync_path(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def write_text(path: str | Path, text: str, *, durable: bool = True) -> Path:
    """Replace the file `path` with `text` (through `.<name>.tmp` beside it; one writer per file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    if durable:
        fsync_path(tmp)
    os.replace(tmp, path)
    if durable:
        fsync_path(path.parent)
    return path

"""Atomic writes: a reader (another process, a rerun after a crash) sees the old content or the whole new
content, never a part. Each writes a temporary sibling (same folder, so same filesystem), renames it onto
the target with `os.replace`, which POSIX makes atomic, and fsyncs the folder so that the rename survives a
crash. A temporary's name is unpredictable and it is created with O_EXCL | O_NOFOLLOW (never through a link
planted at that name)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
import typing as tp
from pathlib import Path

TMP_SUFFIX = ".tmp"  # `<name>.<random hex>.tmp`: what `temporaries` finds


def temporary(path: Path, mode: int = 0o666) -> tuple[Path, int]:
    """A new empty sibling of `path` with an unpredictable name, opened for writing (path, fd); `mode` before
    the umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(8)}{TMP_SUFFIX}")
        try:
            return tmp, os.open(tmp, flags, mode)
        except FileExistsError:
            continue


def fsync_dir(folder: str | Path) -> None:
    """Makes the folder's entries (a rename, a new file) durable."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: tp.Callable[[Path], object], mode: int = 0o666) -> Path:
    """`write(tmp)` writes the whole file to `tmp` (created empty, `mode` before the umask), then `tmp`
    replaces `path` and the folder is fsynced; returns `path`. The temporary is removed if `write` raises;
    `path` is then untouched."""
    path = Path(path)
    tmp, fd = temporary(path, mode)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_parts(path: str | Path, parts: tp.Iterable[bytes], mode: int = 0o600,
                       mtime: float | None = None) -> os.stat_result:
    """Writes `parts` in order through the temporary's own descriptor (never reopened by name), fsyncs it,
    sets its mtime (`mtime`, Unix seconds) and renames it onto `path`, then fsyncs the folder. Returns the
    stat of the file now at `path`, taken after the rename (its ctime included)."""
    path = Path(path)
    tmp, fd = temporary(path, mode)
    try:
        with open(fd, "wb", closefd=True) as f:
            for p in parts:
                f.write(p)
            f.flush()
            if mtime is not None:
                os.utime(f.fileno(), (mtime, mtime))
            os.fsync(f.fileno())
            os.replace(tmp, path)
            st = os.fstat(f.fileno())
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return st


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> tp.Iterator[Path]:
    """Yields a fresh temporary folder beside `path` (created with its parents); when the block ends without
    an error the folder becomes `path`. If `path` appeared meanwhile (built concurrently by another process),
    that one is kept. The temporary is removed in every other case."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        yield tmp
        try:
            os.replace(tmp, path)
        except OSError:  # a non-empty `path` exists: someone else finished first
            if not path.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

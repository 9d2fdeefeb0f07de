"""Atomic writes: a reader (another process, a rerun after a crash) sees the old content or the whole new
content, never a part. Each writes a temporary sibling (same folder, so same filesystem) and renames it onto
the target with `os.replace`, which POSIX makes atomic."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import typing as tp
from pathlib import Path


def atomic_write(path: str | Path, write: tp.Callable[[Path], object]) -> Path:
    """`write(tmp)` writes the whole file to `tmp`, then `tmp` replaces `path`; returns `path`. The temporary
    (`<name>.<pid>.<thread>.tmp`, unique per writer) is removed if `write` raises; `path` is then untouched."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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

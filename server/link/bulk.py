"""Bulk bytes between the web process and the model worker: conversation memory files (up to ≈ 1.1 GB at Moshi
7B) travel as files in a private directory (`private_dir`, mode 0700, owned by the web process: `WorkerEngine.close`
removes it, also after a failed start; a worker whose web process died removes it), and only a `Bulk` reference
crosses the control pipe. The pipe's readers (the web event loop, the worker's control loop)
would otherwise stop for the whole transfer; file reads and writes run on the memory threads and release the GIL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import typing as tp


@dataclasses.dataclass(frozen=True)
class Bulk:
    """A file of `size` bytes at `path`, read (and removed) once by `take`."""

    path: str
    size: int


def private_dir() -> str:
    """A fresh directory for one server's transfers (under $TMPDIR)."""
    return tempfile.mkdtemp(prefix="moshi-ttt-bulk-")


def remove_dir(path: str | None) -> None:
    if path:
        shutil.rmtree(path, ignore_errors=True)


def put(data: bytes, directory: str) -> Bulk:
    """Writes `data` to a new file in `directory`."""
    fd, path = tempfile.mkstemp(dir=directory, suffix=".bulk")
    try:
        with open(fd, "wb", closefd=True) as f:
            f.write(data)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return Bulk(path, len(data))


def take(ref: Bulk) -> bytes:
    """The bytes of `ref`, whose file is then removed; OSError if it is missing or not `size` bytes long."""
    try:
        with open(ref.path, "rb") as f:
            data = f.read()
    finally:
        with contextlib.suppress(OSError):
            os.unlink(ref.path)
    if len(data) != ref.size:
        raise OSError(f"bulk transfer {ref.path}: {len(data)} bytes, expected {ref.size}")
    return data


def discard(payload: tp.Any) -> None:
    """Removes the file of a `Bulk` (or of one under a dict's "data") nobody will take."""
    ref = payload.get("data") if isinstance(payload, dict) else payload
    if isinstance(ref, Bulk):
        with contextlib.suppress(OSError):
            os.unlink(ref.path)

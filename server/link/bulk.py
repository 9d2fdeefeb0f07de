"""Bulk bytes between the web process and the model worker: conversation memory files (up to ≈ 1.1 GB at Moshi
7B) travel as files in a private directory, and only a `Bulk` reference (a file name and a size) crosses the
control pipe. The pipe's readers (the web event loop, the worker's control loop) would otherwise stop for the
whole transfer; file reads and writes run on the memory threads and release the GIL.

No plaintext memory reaches the disk: a `Channel` is the directory and a per-process 256-bit key that exists
only in the two processes' memory (it crosses the control pipe, never a file); every file is sealed with it
(AES-256-GCM in segments, `moshi_ttt.memory.seal`, the file's random id bound into every segment). A file
name from the other side is checked to be one of these names, inside the directory, before it is opened.

The directory (`private_dir`, mode 0700, under $TMPDIR) is named after the web process's pid; the web process
removes it (`WorkerEngine.close`, also after a failed start), a worker whose web process died removes it, and
`sweep` removes those whose web process is gone (a kill -9 of both) at the next start-up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import tempfile
import time
import typing as tp
from pathlib import Path

from moshi_ttt.memory.seal import MemoryUnavailable, Token, seal, unseal

PREFIX = "moshi-ttt-bulk-"
SUFFIX = ".bulk"
_DIR = re.compile(re.escape(PREFIX) + r"(\d+)-[A-Za-z0-9_]+")  # moshi-ttt-bulk-<web pid>-<random>
_LEGACY_DIR = re.compile(re.escape(PREFIX) + r"[A-Za-z0-9_]{8}")  # before the pid was in the name: plaintext
LEGACY_AGE_S = 3600.0  # a legacy directory this old belongs to no running server
_NAME = re.compile(r"([0-9a-f]{32})" + re.escape(SUFFIX))
FINGERPRINT = "bulk"  # the `seal` model fingerprint of a transfer file: binds nothing but the purpose


@dataclasses.dataclass(frozen=True)
class Channel:
    """Where transfers go (`directory`) and the key they are sealed with (`key`, 32 bytes, never on disk)."""

    directory: str
    key: bytes = dataclasses.field(repr=False)

    @classmethod
    def new(cls, directory: str) -> Channel:
        return cls(directory, os.urandom(32))

    def path(self, name: str) -> Path:
        """The file of `name` in the directory; OSError for anything but a transfer file name (a path, `..`)."""
        if not isinstance(name, str) or _NAME.fullmatch(name) is None:
            raise OSError(f"bulk transfer: {str(name)[:80]!r} is not a transfer file name (<32 hex>{SUFFIX})")
        return Path(self.directory) / name


@dataclasses.dataclass(frozen=True)
class Bulk:
    """A sealed file `name` in the channel's directory holding `size` plaintext bytes, read (and removed) once
    by `take`."""

    name: str
    size: int


def private_dir() -> str:
    """A fresh directory for one server's transfers (under $TMPDIR), named after this process."""
    return tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-")


def remove_dir(path: str | None) -> None:
    if path:
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(root: str | None = None, now: float | None = None) -> list[str]:
    """Removes the transfer directories under `root` (default $TMPDIR) owned by this user whose web process is
    gone (and legacy ones older than `LEGACY_AGE_S`); returns them."""
    root = root or tempfile.gettempdir()
    now = time.time() if now is None else now
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if not entry.is_dir(follow_symlinks=False) or st.st_uid != os.getuid():
                continue
            m = _DIR.fullmatch(entry.name)
            stale = (m is not None and not _alive(int(m.group(1)))) or \
                (m is None and _LEGACY_DIR.fullmatch(entry.name) is not None and now - st.st_mtime > LEGACY_AGE_S)
            if stale:
                remove_dir(entry.path)
                removed.append(entry.path)
    return removed


def put(data: bytes, channel: Channel) -> Bulk:
    """Seals `data` into a new file of the channel (created exclusively, mode 0600)."""
    file_id = os.urandom(16).hex()
    name = f"{file_id}{SUFFIX}"
    path = channel.path(name)
    parts = seal(Token(file_id, channel.key), FINGERPRINT, data, {})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with open(fd, "wb", closefd=True) as f:
            for p in parts:
                f.write(p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return Bulk(name, len(data))


def take(ref: Bulk, channel: Channel) -> bytes:
    """The bytes of `ref`, whose file is then removed; OSError if its name is not a transfer file's, or the file
    is missing, not sealed with the channel's key, or not `size` bytes long."""
    path = channel.path(ref.name)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with open(fd, "rb", closefd=True) as f:
            blob = f.read()
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    try:
        data = unseal(Token(_NAME.fullmatch(ref.name).group(1), channel.key), FINGERPRINT, blob)
    except MemoryUnavailable as e:
        raise OSError(f"bulk transfer {ref.name}: not sealed by this server ({e.cause})") from None
    if len(data) != ref.size:
        raise OSError(f"bulk transfer {ref.name}: {len(data)} bytes, expected {ref.size}")
    return data


def discard(payload: tp.Any, channel: Channel | None) -> None:
    """Removes the file of a `Bulk` (or of one under a dict's "data") nobody will take."""
    ref = payload.get("data") if isinstance(payload, dict) else payload
    if isinstance(ref, Bulk) and channel is not None:
        with contextlib.suppress(OSError):
            os.unlink(channel.path(ref.name))

"""Sealed conversation memories in a store (one object per memory id: a local directory or an S3 bucket,
`backends`), keyed by client tokens (`seal`); `open_store(spec, ttl, max_bytes)` opens one from a spec.

Every way a token can fail (malformed, unknown id, wrong key, tampered, expired, another model) raises the
same `seal.MemoryUnavailable`; its `cause` (for the server log only) says which. Writes are atomic (the
backend's `put`); `gc` drops expired memories, then the least recently used until `max_bytes`.
"""

from __future__ import annotations

import struct
import time
import typing as tp
from pathlib import Path

from moshi_ttt.memory.backends import Backend, backend
from moshi_ttt.memory.seal import (
    SEGMENT,
    MemoryUnavailable,
    Token,
    is_memory_id,
    key_matches,
    read_header,
    seal,
    unseal,
)

DAY = 86400.0
SUFFIX = ".mem"
HEADER_BYTES = 1 << 16  # a stored header is well under this (its fields are fixed and small)


class MemoryStore:
    """Memories in a backend (`backends`: a local directory, an S3 bucket; `<id>.mem`), `ttl` seconds
    after their last save, at most `max_bytes` in all (None: unbounded), the least recently used (saved or
    loaded) evicted first; sealed in `segment`-byte segments. `root`: a backend or a spec (`open_store`)."""

    def __init__(self, root: str | Path | Backend, ttl: float = 30 * DAY, max_bytes: int | None = None,
                 clock: tp.Callable[[], float] = time.time, segment: int = SEGMENT):
        if not ttl > 0:
            raise ValueError(f"memory store: ttl must be > 0 seconds, got {ttl!r}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"memory store: max_bytes must be >= 0, got {max_bytes!r}")
        if not 0 < segment < 1 << 31:
            raise ValueError(f"memory store: segment must be in (0, 2**31) bytes, got {segment!r}")
        self.backend = backend(root) if isinstance(root, (str, Path)) else root
        self.where = self.backend.where
        self.ttl, self.max_bytes, self.clock, self.segment = float(ttl), max_bytes, clock, segment

    def path(self, memory_id: str) -> tp.Any:
        """The backend's address of `memory_id` (a `Path` in a local directory); refuses a malformed id."""
        if not is_memory_id(memory_id):
            raise MemoryUnavailable(f"malformed id {memory_id[:40]!r}", "malformed_id")
        return self.backend.locate(f"{memory_id}{SUFFIX}")

    def save(self, token: Token, fp: str, data: bytes, meta: tp.Mapping[str, tp.Any] | None = None) -> float:
        """Seals and stores `data` under `token.id` (replacing any older version: its key stops working);
        returns the expiry time. `meta`: extra non-secret header fields (frames, compression)."""
        now = self.clock()
        parts = seal(token, fp, data, dict(meta or {}, saved=now), self.segment)
        self._write(self.path(token.id), parts)
        self.gc(keep=token.id)
        return now + self.ttl

    def _write(self, path: tp.Any, parts: tp.Sequence[bytes]) -> None:
        self.backend.put(path, parts, self.clock())

    def load(self, token: Token | str, fp: str) -> bytes:
        """The memory file of `token`; marks it used (LRU). `MemoryUnavailable` for every failure."""
        token = Token.parse(token) if isinstance(token, str) else token
        path = self.path(token.id)
        try:
            blob = self.backend.get(path)
        except FileNotFoundError:
            raise MemoryUnavailable("unknown id", "unknown_id") from None
        data = unseal(token, fp, blob)
        if self._expired(read_header(blob)[0]):
            raise MemoryUnavailable("expired", "expired")
        self.backend.touch(path, self.clock())
        return data

    def delete(self, token: Token | str) -> None:
        """Removes the memory of `token` at once; `MemoryUnavailable` unless the token's key is its key."""
        token = Token.parse(token) if isinstance(token, str) else token
        path = self.path(token.id)
        try:
            head, _ = read_header(self.backend.head(path, HEADER_BYTES))
        except FileNotFoundError:
            raise MemoryUnavailable("unknown id", "unknown_id") from None
        except (ValueError, struct.error) as e:
            raise MemoryUnavailable(f"tampered: unreadable header ({e})", "tampered") from None
        if not key_matches(token, head):
            raise MemoryUnavailable("wrong key", "wrong_key")
        self.backend.delete(path)

    # -- operator side (`moshi-ttt memory`): metadata only --------------------------------------------------

    def entries(self) -> list[dict]:
        """Per stored memory: its header without the key check, plus bytes, last_used, expires."""
        out = []
        for st in self.backend.list(SUFFIX):
            if not is_memory_id(st.name[:-len(SUFFIX)]):
                continue
            try:
                head = read_header(self.backend.head(self.backend.locate(st.name), HEADER_BYTES))[0]
            except (OSError, ValueError, struct.error):
                continue
            head = {k: v for k, v in head.items() if k not in ("check", "nonce")}
            out.append(dict(head, bytes=st.size, last_used=st.used, expires=head["saved"] + self.ttl))
        return out

    def show(self, memory_id: str) -> dict:
        for e in self.entries():
            if e["id"] == memory_id:
                return e
        raise KeyError(f"no memory {memory_id!r} in {self.where}")

    def remove(self, memory_id: str) -> bool:
        """Operator removal, without a token."""
        return self.backend.delete(self.path(memory_id))

    def _expired(self, head: dict) -> bool:
        return self.clock() > float(head.get("saved", 0)) + self.ttl

    def gc(self, keep: str | None = None) -> list[str]:
        """Removes expired memories, then the least recently used until the total fits `max_bytes` (never
        `keep`, the one just saved), and temporaries left by killed writers (older than an hour). Returns
        the removed ids. One listing, plus (where the listing lacks the save time: a local directory) each
        memory's header."""
        now, removed = self.clock(), []
        self.backend.sweep(SUFFIX, now, 3600)
        live = []
        for st in self.backend.list(SUFFIX):
            mid = st.name[:-len(SUFFIX)]
            if not is_memory_id(mid):
                continue
            saved = st.saved
            if saved is None:
                try:
                    saved = float(read_header(self.backend.head(self.backend.locate(st.name), HEADER_BYTES))[0]
                                  ["saved"])
                except (OSError, ValueError, KeyError, struct.error):
                    continue
            if now > saved + self.ttl and mid != keep:
                self.remove(mid)
                removed.append(mid)
            else:
                live.append(st)
        if self.max_bytes is not None:
            total = sum(st.size for st in live)
            for st in sorted(live, key=lambda st: st.used):
                if total <= self.max_bytes:
                    break
                mid = st.name[:-len(SUFFIX)]
                if mid == keep:
                    continue
                self.remove(mid)
                removed.append(mid)
                total -= st.size
        return removed


def open_store(spec: str | Path, ttl: float = 30 * DAY, max_bytes: int | None = None) -> MemoryStore:
    """The store of `--memory-store`: a directory, or `s3://bucket/prefix` (see `memory_backends.S3Backend`
    for its credentials and endpoint); `ttl` in seconds, `max_bytes` None for unbounded."""
    return MemoryStore(spec, ttl=ttl, max_bytes=max_bytes)

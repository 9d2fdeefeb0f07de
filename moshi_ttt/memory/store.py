"""Sealed conversation memories in a store (one object per memory id: a local directory or an S3 bucket,
`backends`), keyed by client tokens (`seal`); `open_store(spec, ...)` opens one from a spec.

Objects: `<id>.mem` (the sealed memory), `<id>.gone` (a tombstone: deleted less than `ttl` ago; a save of
that id is refused) and `owners/<owner>/<id>.<bytes>` (an empty marker per memory under its owner's digest:
a quota check lists one owner's markers, nothing else).

* `open(token, fp)` reads only the size-capped header and checks the key first, then the model, expiry;
  `read(opened)` reads the body, only if it is still the version opened. Every way a token can fail
  (malformed, unknown id, wrong key, tampered, expired, another model, changed) raises the same
  `seal.MemoryUnavailable`; its `cause` (for the server log only) says which.
* `save(..., owner, expect)` is a compare-and-swap: it creates (`expect` None) or replaces the version
  `expect` only (`StaleWrite` otherwise, and for a tombstoned or expired id). A new memory over the owner's
  quota is `QuotaExceeded`; over the store's bound `StoreFull`. Nothing is ever evicted.
* `gc()` (periodic or on demand, never on the save path) decides from listings alone: expired memories,
  old tombstones, orphan markers, killed writers' temporaries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import shutil
import struct
import threading
import time
import typing as tp
from pathlib import Path

from moshi_ttt.memory.backends import ANY, Backend, LocalBackend, backend
from moshi_ttt.memory.errors import Conflict, QuotaExceeded, StaleWrite, StoreError, StoreFull
from moshi_ttt.memory.seal import (
    HEADER_CAP,
    SEGMENT,
    MemoryUnavailable,
    Token,
    header_length,
    is_memory_id,
    key_matches,
    read_header,
    seal,
    unseal,
)

__all__ = ["DAY", "MemoryStore", "Opened", "QuotaExceeded", "Saved", "StaleWrite", "StoreError", "StoreFull",
           "open_store"]

DAY = 86400.0
SUFFIX = ".mem"
GONE = ".gone"
HEADER_FIRST = 4096  # bytes of a memory's first read (its header is ≈ 700 B; a longer one is read again, capped)
TOMBSTONE = b"deleted\n"  # a tombstone's content (not empty: one ranged GET reads it on S3)
OWNERS = "owners/"
GRACE = 3600.0  # seconds past expiry before `gc` removes a memory; also the age of a killed writer's leftovers
QUOTA_MEMORIES = 20  # per owner (`--memory-quota-memories`)
QUOTA_BYTES = 8 << 30  # per owner (`--memory-quota-bytes`): 7 dense exact memories at 7B, 15 bf16
S3_MAX_BYTES = 1 << 40  # an S3 store's bound when none is given
DISK_RESERVE = 0.10  # a local store's default bound leaves this share of its disk free
USAGE_REFRESH = 60.0  # seconds a store's byte total (one listing) is reused for the bound check


@dataclasses.dataclass(frozen=True)
class Opened:
    """A memory whose key is proven (`MemoryStore.open`): its header, stored version and size in bytes."""

    token: Token
    header: dict
    version: str
    size: int


@dataclasses.dataclass(frozen=True)
class Saved:
    expires: float
    version: str


def owner_digest(owner: str) -> str:
    """The name of an owner in the store (its markers' folder, the memory header's `owner`): never the owner
    string itself (an address, an API key)."""
    return hashlib.sha256(b"moshi-ttt-owner|" + owner.encode()).hexdigest()[:32]


class MemoryStore:
    """Memories in a backend (`backends`: a local directory, an S3 bucket), `ttl` seconds after their last
    save; sealed in `segment`-byte segments. Bounds: at most `max_bytes` in all (None: a local store's free
    disk less `DISK_RESERVE` plus what it holds; `S3_MAX_BYTES` on S3), and per owner `quota_memories`
    memories and `quota_bytes` bytes (None: unbounded). `root`: a backend or a spec (`open_store`).
    `bytes_read`: bytes read from the backend by `open` and `read`."""

    def __init__(self, root: str | Path | Backend, ttl: float = 30 * DAY, max_bytes: int | None = None,
                 clock: tp.Callable[[], float] = time.time, segment: int = SEGMENT,
                 quota_memories: int | None = QUOTA_MEMORIES, quota_bytes: int | None = QUOTA_BYTES):
        if not ttl > 0:
            raise ValueError(f"memory store: ttl must be > 0 seconds, got {ttl!r}")
        for name, v in (("max_bytes", max_bytes), ("quota_memories", quota_memories),
                        ("quota_bytes", quota_bytes)):
            if v is not None and v < 0:
                raise ValueError(f"memory store: {name} must be >= 0, got {v!r}")
        if not 0 < segment < 1 << 31:
            raise ValueError(f"memory store: segment must be in (0, 2**31) bytes, got {segment!r}")
        self.backend = backend(root) if isinstance(root, (str, Path)) else root
        self.where = self.backend.where
        self.ttl, self.clock, self.segment = float(ttl), clock, segment
        self.quota_memories, self.quota_bytes = quota_memories, quota_bytes
        self.max_bytes = self._default_bound() if max_bytes is None else max_bytes
        self.bytes_read = 0
        self._usage: tuple[float, int] | None = None  # (when listed, bytes) for the bound check
        self._mutex = threading.Lock()

    def _default_bound(self) -> int:
        if not isinstance(self.backend, LocalBackend):
            return S3_MAX_BYTES
        disk = shutil.disk_usage(self.backend.root)
        held = sum(st.size for st in self.backend.list("", SUFFIX))
        return held + max(0, disk.free - int(DISK_RESERVE * disk.total))

    def path(self, memory_id: str) -> tp.Any:
        """The backend's address of `memory_id` (a `Path` in a local directory); refuses a malformed id."""
        if not is_memory_id(memory_id):
            raise MemoryUnavailable(f"malformed id {memory_id[:40]!r}", "malformed_id")
        return self.backend.locate(f"{memory_id}{SUFFIX}")

    @staticmethod
    def _token(token: Token | str) -> Token:
        return Token.parse(token) if isinstance(token, str) else token

    # -- resume: the header, then the body ------------------------------------------------------------------

    def _head(self, memory_id: str) -> tuple[dict, str, int]:
        """(header, version, size) of the stored memory; `MemoryUnavailable` if it is unknown or unreadable."""
        loc = self.path(memory_id)
        try:
            blob, version, size = self.backend.head(loc, HEADER_FIRST)
            self.bytes_read += len(blob)
            if len(blob) < header_length(blob) <= HEADER_CAP:  # a longer header, within the cap: read it all
                blob, again, size = self.backend.head(loc, header_length(blob))
                self.bytes_read += len(blob)
                if again != version:
                    raise MemoryUnavailable("changed while its header was read", "changed")
        except FileNotFoundError:
            raise MemoryUnavailable("unknown id", "unknown_id") from None
        try:
            return read_header(blob)[0], version, size
        except (ValueError, struct.error) as e:
            raise MemoryUnavailable(f"tampered: unreadable header ({e})", "tampered") from None

    def open(self, token: Token | str, fp: str) -> Opened:
        """Reads the memory's header alone (at most `seal.HEADER_CAP` bytes) and checks, in this order, the
        key, the model fingerprint and the expiry; `MemoryUnavailable` for every failure."""
        token = self._token(token)
        head, version, size = self._head(token.id)
        if not key_matches(token, head):
            raise MemoryUnavailable("wrong key", "wrong_key")
        if head.get("fingerprint") != fp:
            raise MemoryUnavailable(f"another model (fingerprint {str(head.get('fingerprint'))[:16]}…)",
                                    "another_model")
        if self._expired(head):
            raise MemoryUnavailable("expired", "expired")
        return Opened(token, head, version, size)

    def read(self, opened: Opened) -> bytes:
        """The memory file of an `open`ed memory: its body read and unsealed; `MemoryUnavailable` if it is no
        longer the version opened (saved, deleted) or does not unseal."""
        try:
            blob = self.backend.get(self.path(opened.token.id), opened.version)
        except (FileNotFoundError, Conflict):
            raise MemoryUnavailable("changed since it was opened", "changed") from None
        self.bytes_read += len(blob)
        return unseal(opened.token, opened.header["fingerprint"], blob)

    def load(self, token: Token | str, fp: str) -> bytes:
        """`read(open(token, fp))`."""
        return self.read(self.open(token, fp))

    # -- save and delete --------------------------------------------------------------------------------------

    def _tombstoned(self, memory_id: str) -> bool:
        try:
            self.backend.head(self.backend.locate(f"{memory_id}{GONE}"), len(TOMBSTONE))
        except FileNotFoundError:
            return False
        return True

    def save(self, token: Token, fp: str, data: bytes, meta: tp.Mapping[str, tp.Any] | None = None, *,
             owner: str, expect: str | None) -> Saved:
        """Seals and stores `data` under `token.id` for `owner` (`meta`: extra non-secret header fields:
        frames, compression). `expect` None creates the memory (`StaleWrite` if the id exists or is deleted);
        else it replaces the stored version `expect` only (`StaleWrite` if it is another, gone or expired).
        A new memory is refused over the owner's quota (`QuotaExceeded`) or the store's bound (`StoreFull`);
        a replacement only over the owner's bytes. Returns the expiry and the new version."""
        now = self.clock()
        path = self.path(token.id)
        who = owner_digest(owner)
        parts = seal(token, fp, data, dict(meta or {}, saved=now, owner=who), self.segment)
        size = sum(len(p) for p in parts)
        with self.backend.lock(f"{token.id}{SUFFIX}"):
            if self._tombstoned(token.id):
                raise StaleWrite(f"memory {token.id[:8]}… was deleted: not saved again")
            old_owner, old_size = None, 0
            if expect is None:
                self._check_bound(size)
            else:
                try:
                    head, version, old_size = self._head(token.id)
                except MemoryUnavailable as e:
                    raise StaleWrite(f"memory {token.id[:8]}… is not the version this save replaces "
                                     f"({e.cause})") from None
                if version != expect:
                    raise StaleWrite(f"memory {token.id[:8]}… was saved meanwhile by another writer")
                if self._expired(head):
                    raise StaleWrite(f"memory {token.id[:8]}… expired before this save")
                old_owner = head.get("owner")
            self._check_quota(who, token.id, size, old_size if old_owner == who else 0, new=expect is None
                              or old_owner != who)
            marker = self._mark(who, token.id, size, now)
            try:
                version = self.backend.put(path, parts, now, expect)
            except Conflict:
                self._unmark(marker)
                raise StaleWrite(f"memory {token.id[:8]}… was saved or deleted meanwhile by another writer") \
                    from None
            except BaseException:
                self._unmark(marker)
                raise
            self._unmark_others(who, old_owner, token.id, marker)
        with self._mutex:
            if self._usage is not None:
                self._usage = (self._usage[0], self._usage[1] + size - old_size)
        return Saved(now + self.ttl, version)

    def _check_bound(self, size: int) -> None:
        with self._mutex:
            now = self.clock()
            if self._usage is None or now - self._usage[0] > USAGE_REFRESH:
                self._usage = (now, sum(st.size for st in self.backend.list("", SUFFIX)))
            used = self._usage[1]
        if used + size > self.max_bytes:
            raise StoreFull(f"memory store {self.where} is full ({used} of {self.max_bytes} bytes): "
                            f"a new memory of {size} bytes refused")

    def _markers(self, who: str) -> list[tuple[str, int, str]]:
        """(memory id, bytes, marker name) of each marker of owner `who`: one listing of its folder."""
        out = []
        for st in self.backend.list(f"{OWNERS}{who}/"):
            mid, _, n = st.name.rsplit("/", 1)[1].partition(".")
            if is_memory_id(mid) and n.isdigit():
                out.append((mid, int(n), st.name))
        return out

    def _check_quota(self, who: str, memory_id: str, size: int, old_size: int, new: bool) -> None:
        if self.quota_memories is None and self.quota_bytes is None:
            return
        others: dict[str, int] = {}
        for mid, n, _ in self._markers(who):
            if mid != memory_id:
                others[mid] = max(n, others.get(mid, 0))
        if new and self.quota_memories is not None and len(others) >= self.quota_memories:
            raise QuotaExceeded(f"owner {who[:8]}… holds {len(others)} memories, its quota: a new one refused")
        total = sum(others.values()) + size
        if self.quota_bytes is not None and total > self.quota_bytes and size > old_size:
            raise QuotaExceeded(f"owner {who[:8]}… would hold {total} bytes, over its quota of "
                                f"{self.quota_bytes}")

    def _mark(self, who: str, memory_id: str, size: int, now: float) -> str:
        name = f"{OWNERS}{who}/{memory_id}.{size}"
        self.backend.put(self.backend.locate(name), [b""], now, ANY)
        return name

    def _unmark(self, name: str) -> None:
        with contextlib.suppress(OSError):
            self.backend.delete(self.backend.locate(name))

    def _unmark_others(self, who: str, old_owner: str | None, memory_id: str, keep: str) -> None:
        """The markers of `memory_id` other than `keep` (a former size, or a former owner's)."""
        for o in {who, old_owner or who}:
            for mid, _, name in self._markers(o):
                if mid == memory_id and name != keep:
                    self._unmark(name)

    def delete(self, token: Token | str) -> None:
        """Removes the memory of `token` at once and leaves a tombstone for `ttl` (a later save of the id is
        `StaleWrite`); `MemoryUnavailable` unless the token's key is its key."""
        token = self._token(token)
        with self.backend.lock(f"{token.id}{SUFFIX}"):
            head, _, _ = self._head(token.id)
            if not key_matches(token, head):
                raise MemoryUnavailable("wrong key", "wrong_key")
            self._bury(token.id, head.get("owner"))

    def _bury(self, memory_id: str, owner: str | None, version: str | None = None) -> bool:
        """Tombstone, then the memory (only `version`, if given), then its markers; True if it was removed."""
        self.backend.put(self.backend.locate(f"{memory_id}{GONE}"), [TOMBSTONE], self.clock(), ANY)
        removed = self.backend.delete(self.path(memory_id), version)
        if removed and owner:
            for mid, _, name in self._markers(owner):
                if mid == memory_id:
                    self._unmark(name)
        return removed

    # -- operator side (`moshi-ttt memory`): metadata only --------------------------------------------------

    def _entry(self, memory_id: str) -> dict:
        head, _, size = self._head(memory_id)
        head = {k: v for k, v in head.items() if k not in ("check", "nonce")}
        return dict(head, bytes=size, expires=float(head.get("saved", 0)) + self.ttl)

    def entries(self) -> list[dict]:
        """Per stored memory: its header without the key check, plus bytes and expires (reads every header:
        the operator's `ls`, never the serving path)."""
        out = []
        for st in self.backend.list("", SUFFIX):
            mid = st.name[:-len(SUFFIX)]
            if is_memory_id(mid):
                with contextlib.suppress(MemoryUnavailable, OSError):
                    out.append(self._entry(mid))
        return out

    def show(self, memory_id: str) -> dict:
        try:
            return self._entry(memory_id)
        except MemoryUnavailable:
            raise KeyError(f"no memory {memory_id!r} in {self.where}") from None

    def remove(self, memory_id: str) -> bool:
        """Operator removal, without a token (a tombstone too: a live conversation cannot save it back)."""
        self.path(memory_id)  # refuses a malformed id
        with self.backend.lock(f"{memory_id}{SUFFIX}"):
            try:
                owner = self._head(memory_id)[0].get("owner")
            except MemoryUnavailable as e:
                if e.label == "unknown_id":
                    return False
                owner = None
            return self._bury(memory_id, owner)

    def _expired(self, head: dict) -> bool:
        return self.clock() > float(head.get("saved", 0)) + self.ttl

    def gc(self) -> list[str]:
        """Removes memories expired more than `GRACE` ago (by their listed save time: no header is read),
        each only if it is still the version listed; tombstones older than `ttl`; owner markers whose memory
        is gone; killed writers' temporaries older than `GRACE`. Returns the removed memory ids. A save
        never replaces an expired memory, so a memory still listed as expired `GRACE` after its expiry is
        not one another instance is saving (docs/memory.md)."""
        now, removed = self.clock(), []
        self.backend.sweep(now, GRACE)
        live = set()
        for st in self.backend.list("", SUFFIX):
            mid = st.name[:-len(SUFFIX)]
            if not is_memory_id(mid):
                continue
            if now > st.saved + self.ttl + GRACE:
                with self.backend.lock(st.name):
                    if self.backend.delete(self.backend.locate(st.name), st.version):
                        removed.append(mid)
                        continue
            live.add(mid)
        for st in self.backend.list("", GONE):
            if now > st.saved + self.ttl:
                with contextlib.suppress(FileNotFoundError):
                    self.backend.delete(self.backend.locate(st.name))
        for folder in self.backend.folders(OWNERS):
            for st in self.backend.list(folder):
                if st.name.rsplit("/", 1)[1].partition(".")[0] not in live and now > st.saved + GRACE:
                    self._unmark(st.name)
        return removed


def open_store(spec: str | Path, ttl: float = 30 * DAY, max_bytes: int | None = None,
               quota_memories: int | None = QUOTA_MEMORIES, quota_bytes: int | None = QUOTA_BYTES) -> MemoryStore:
    """The store of `--memory-store`: a directory, or `s3://bucket/prefix` (see `backends.S3Backend` for its
    credentials and endpoint); `ttl` in seconds; `max_bytes` None for the default bound; the per-owner
    quotas (None: unbounded)."""
    return MemoryStore(spec, ttl=ttl, max_bytes=max_bytes, quota_memories=quota_memories, quota_bytes=quota_bytes)

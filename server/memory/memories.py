"""Conversation memory on the web side: the store, the tokens, and one conversation's saves and restore.

The model side (`slot_memory`, in the model worker) turns a slot's fast weights into memory file bytes and
back; this side seals and stores them (`MemoryStore`, on a thread: never on the event loop, never on the
step path). A conversation that asked for memory (`?memory=1`) gets a `Token` (id + 256-bit key, sent to
the client, never stored).

A resume (`?resume=TOKEN`) costs nothing until its key is proven: `Memories.open` reads the stored header
only (`MemoryStore.open`) and checks the key, and only then marks the id in use on this instance (before any
load: of concurrent resumes of one id exactly one gets it); the session then passes admission and claims a
slot, and only then is the body read (`Memories.read`, at most `max_loads` at once). The resumed conversation
is sent a new token for the same id, but its memory stays sealed with the old key until the client confirms
the new one (`ConversationMemory.confirm`, docs/protocol.md): a client that drops before that keeps a token
that opens its memory.

Every save is conditional on the version this conversation last read or wrote (`expect`), under the owner
`owner` (the client's address group, for the store's quotas): a save that lost a race (the memory was deleted,
or resumed and saved elsewhere) fails safely (`StaleWrite`: logged, counted, no later save is tried), and the
conversation goes on. A new memory the store refuses (`QuotaExceeded`, `StoreFull`) ends the conversation with
its reason. Its memory is saved every `save_every` chunks (`checkpoint`) and when it ends (`final`).

Every failure of a token (malformed, unknown id, wrong key, tampered, expired, deleted, in use on this
instance) is the same refusal for the client (`Reason.MEMORY_UNAVAILABLE`); the real cause goes to the
log and to the failures metric.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import typing as tp
from dataclasses import dataclass

from moshi_ttt.memory.seal import MemoryUnavailable, Token
from moshi_ttt.memory.store import MemoryStore, Opened, QuotaExceeded, StaleWrite, StoreError, StoreFull

from ..core.engine_api import ServingEngine
from ..core.reasons import Reason
from ..metrics import Metrics

log = logging.getLogger("moshi_ttt.server.memory")

DEFAULT_SAVE_EVERY = 4  # chunks between checkpoints
DEFAULT_MAX_LOADS = 2  # memory bodies read and unsealed at once (each up to ≈ 1.1 GB at Moshi 7B)
DEFAULT_GC_EVERY = 3600.0  # seconds between two collections of the store's expired memories
SAVE_TIMEOUT_S = 30.0  # one save (worker + seal + write) or restore; also how long shutdown waits for saves


class MemoryOpFailed(RuntimeError):
    """A save or restore that did not complete; the message is for the log."""


@dataclass(frozen=True)
class MemoryConfig:
    save_every: int = DEFAULT_SAVE_EVERY  # chunks; 0 = only when the conversation ends
    chunk_size: int = 16  # frames per chunk (the TTT config's)
    timeout: float = SAVE_TIMEOUT_S
    max_loads: int = DEFAULT_MAX_LOADS
    gc_every: float = DEFAULT_GC_EVERY  # seconds; 0 = never (an operator runs `moshi-ttt memory gc`)

    def __post_init__(self) -> None:
        if self.max_loads < 1:
            raise ValueError(f"memory: max_loads must be >= 1, got {self.max_loads!r}")
        if not self.gc_every >= 0:
            raise ValueError(f"memory: gc_every must be >= 0 seconds, got {self.gc_every!r}")


async def engine_call(start: tp.Callable[..., None], *args, timeout: float, **kwargs) -> tp.Any:
    """Runs an engine memory request (`Engine.save_memory` / `restore_memory`, or the worker's) whose
    `done(ok, payload)` may come from any thread; returns the payload, raises `MemoryOpFailed`."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future = loop.create_future()

    def settle(ok: bool, payload: tp.Any) -> None:
        if not fut.done():
            if ok:
                fut.set_result(payload)
            else:
                fut.set_exception(MemoryOpFailed(str(payload)))

    def done(ok: bool, payload: tp.Any) -> None:
        loop.call_soon_threadsafe(settle, ok, payload)

    start(*args, done=done, **kwargs)
    try:
        return await asyncio.wait_for(fut, timeout)
    except asyncio.TimeoutError:
        raise MemoryOpFailed(f"no answer from the model within {timeout:g} s") from None


class Memories:
    """One server's conversation memory: `store` (MemoryStore, used through its public methods only), the
    model's `fingerprint`, the ids of the conversations remembered on this instance now (`live`: marked before
    any load) and those deleted while live (their saves stop)."""

    def __init__(self, store: MemoryStore, fingerprint: str, metrics: Metrics, cfg: MemoryConfig):
        self.store, self.fingerprint, self.metrics, self.cfg = store, fingerprint, metrics, cfg
        self.live: set[str] = set()
        self.deleted: set[str] = set()
        self._loads = asyncio.Semaphore(cfg.max_loads)

    def expires(self) -> float:
        return time.time() + self.store.ttl

    async def collect(self) -> int:
        """One collection of the store (`MemoryStore.gc`, on a thread: listings only, never on a save's path):
        the number of expired memories removed, counted; a store failure is logged and counted, never raised."""
        try:
            removed = await asyncio.to_thread(self.store.gc)
        except StoreError as e:
            self.metrics.inc_memory_failure("store")
            log.warning("memory store collection failed: %s", e)
            return 0
        if removed:
            self.metrics.inc_memory_collected(len(removed))
            log.info("memory store: %d expired memories removed", len(removed))
        return len(removed)

    async def collect_forever(self) -> None:
        """`collect` every `cfg.gc_every` seconds, the first one at once (a task of the web app's lifetime)."""
        while True:
            await self.collect()
            await asyncio.sleep(self.cfg.gc_every)

    async def open(self, token_text: str) -> Opened:
        """A resume's token checked against its stored header (nothing else is read), then its id marked in use
        here (`release` when the conversation is over). `MemoryUnavailable` for any failure, also a store
        failure, and "in use" only to a holder of the key (logged and counted by the caller through
        `refused`)."""
        token = Token.parse(token_text)
        try:
            opened = await asyncio.to_thread(self.store.open, token, self.fingerprint)
        except StoreError as e:
            raise MemoryUnavailable(f"store failure: {e}", e.label) from None
        if token.id in self.live:  # no await since the check: of concurrent resumes of one id, one gets it
            raise MemoryUnavailable("in use: a conversation on this instance holds it", "in_use")
        self.live.add(token.id)
        return opened

    async def read(self, opened: Opened) -> bytes:
        """The body of an opened memory (at most `max_loads` at once); `MemoryUnavailable` if it changed since
        `open` or the store failed."""
        async with self._loads:
            t0 = time.perf_counter()
            try:
                data = await asyncio.to_thread(self.store.read, opened)
            except StoreError as e:
                raise MemoryUnavailable(f"store failure: {e}", e.label) from None
        self.metrics.observe_memory_read(time.perf_counter() - t0, len(data))
        return data

    def release(self, memory_id: str) -> None:
        """A conversation holding `memory_id` here is over (idempotent)."""
        self.live.discard(memory_id)
        self.deleted.discard(memory_id)

    def refused(self, e: MemoryUnavailable, peer: str, what: str) -> None:
        self.metrics.inc_memory_failure(e.label)
        log.warning("memory %s from %s refused: %s", what, peer, e.cause)

    async def write(self, token: Token, data: bytes, meta: dict, trigger: str, t0: float, *, owner: str,
                    expect: str | None) -> tp.Any:
        """Seals and stores `data` (thread) if the stored version is `expect` (None: a new memory); returns the
        store's `Saved` (expires, version). Counts the save (`trigger`: checkpoint, end, resume) with its seconds
        since `t0` (perf_counter) and bytes. The store's errors propagate."""
        saved = await asyncio.to_thread(self.store.save, token, self.fingerprint, data, meta, owner=owner,
                                        expect=expect)
        self.metrics.observe_memory_save(trigger, time.perf_counter() - t0, len(data))
        return saved

    async def delete(self, token_text: str, memory_id: str, peer: str) -> bool:
        """`DELETE /api/memory/{id}`: True if `token_text` opens memory `memory_id` and it was removed (a
        tombstone stays: a save in flight cannot bring it back). `StoreError`: the store failed."""
        try:
            token = Token.parse(token_text)
            if token.id != memory_id:
                raise MemoryUnavailable("token of another id", "token_of_another_id")
            await asyncio.to_thread(self.store.delete, token)
        except MemoryUnavailable as e:
            self.refused(e, peer, "delete")
            return False
        if memory_id in self.live:
            self.deleted.add(memory_id)
        self.metrics.inc_memory_deleted()
        log.info("memory %s… deleted by its client (%s)", memory_id[:8], peer)
        return True


NOTHING_STORED = "nothing stored"  # a save of a new conversation that heard nothing: a success that wrote nothing
# what a store refusal of a NEW memory ends the conversation with
_NEW_MEMORY_REFUSED = {QuotaExceeded: Reason.MEMORY_QUOTA, StoreFull: Reason.MEMORY_STORE_FULL}


class ConversationMemory:
    """One conversation's memory: `token` (the key its memory is sealed with now), `version` (of the stored
    memory, as this conversation last read or wrote it; None: nothing stored yet), `owner` (the store's quota
    owner), `frames` restored (None for a new memory), saves one at a time. A resume's new token waits in
    `pending` until the client confirms it. `refusal`: the store refused the new memory (the session ends the
    conversation with it); `stopped`: no later save is tried (refused, stale, deleted)."""

    def __init__(self, memories: Memories, engine: ServingEngine, token: Token, owner: str,
                 opened: Opened | None = None):
        self.memories, self.engine, self.token, self.owner = memories, engine, token, owner
        self.opened = opened
        self.version: str | None = opened.version if opened is not None else None
        self.resumed_frames: int | None = None
        self.slot = self.conv_id = None
        self._lock = asyncio.Lock()
        self._checkpoint: asyncio.Task | None = None
        self.pending: Token | None = Token.new(token.id) if opened is not None else None
        self.confirmed = False
        self.refusal: Reason | None = None
        self.stopped = False
        self.saves = 0
        memories.live.add(token.id)

    @property
    def resumed(self) -> bool:
        return self.opened is not None

    def attach(self, slot: tp.Any, conv_id: int) -> None:
        self.slot, self.conv_id = slot, conv_id

    async def restore(self, data: bytes) -> dict:
        """Into the attached slot (claimed, reset, not stepped). Returns the restored {"frames", "telemetry"};
        `MemoryOpFailed` on failure."""
        t0 = time.perf_counter()
        out = await engine_call(self.engine.restore_memory, self.slot, self.conv_id, data,
                                timeout=self.memories.cfg.timeout)
        self.resumed_frames = int(out["frames"])
        self.memories.metrics.observe_memory_restore(time.perf_counter() - t0, len(data))
        return out

    def message(self, expires: float) -> dict:
        """The 0x04 `memory` object (a resume's: the new token, to be confirmed)."""
        token = self.pending or self.token
        body = {"id": token.id, "token": str(token), "expires": round(expires, 3)}
        if self.resumed:
            body.update(resumed=True, frames=self.resumed_frames)
        return {"memory": body}

    async def confirm(self, text: str) -> dict:
        """The client confirms the new token `text` of a resume: the memory is re-sealed with it (a save now; from
        then on the old token opens nothing). Returns the 0x04 `memory` answer: {"confirmed": true, "id",
        "expires"}, or {"error": why} (nothing changed; the conversation goes on)."""
        async with self._lock:
            if self.pending is None:
                why = ("this token was already confirmed" if self.confirmed else
                       "nothing to confirm: only a resumed conversation's new token is confirmed")
                return {"memory": {"error": why}}
            if not hmac.compare_digest(str(text).encode("utf-8", "replace"), str(self.pending).encode()):
                return {"memory": {"error": "not the token this conversation was sent"}}
            old, self.token = self.token, self.pending
            saved = await self._save("resume", final=False)
            if saved is None:
                self.token = old
                return {"memory": {"error": "the memory could not be re-sealed with the new token; the old token "
                                            "still opens it"}}
            self.pending, self.confirmed = None, True
            log.info("memory %s… re-sealed with its confirmed new token", self.token.id[:8])
            return {"memory": {"confirmed": True, "id": self.token.id, "expires": round(saved.expires, 3)}}

    def frames_processed(self, frames: int) -> None:
        """The conversation's output frame count (one per input frame): a checkpoint every `save_every` chunks."""
        every = self.memories.cfg.save_every * self.memories.cfg.chunk_size
        if every > 0 and frames % every == 0 and (self._checkpoint is None or self._checkpoint.done()):
            self._checkpoint = asyncio.create_task(self.save("checkpoint"), name="memory-checkpoint")

    async def save(self, trigger: str, final: bool = False) -> bool:
        """Saves the slot's memory now (`final`: after the frames it has queued); False (logged, counted) if
        it could not be saved."""
        async with self._lock:
            return await self._save(trigger, final) is not None

    async def _save(self, trigger: str, final: bool) -> tp.Any:
        """Under the lock: the `Saved` of a save, `NOTHING_STORED`, or None (failed)."""
        if self.stopped or self.token.id in self.memories.deleted:
            return None
        t0 = time.perf_counter()
        try:
            out = await engine_call(self.engine.save_memory, self.slot, self.conv_id, final=final,
                                    timeout=self.memories.cfg.timeout)
            if out["data"] is None:  # a new conversation that heard nothing (`slot_memory`)
                return NOTHING_STORED
            meta = {k: out[k] for k in ("frames", "chunks", "compression")}
            saved = await self.memories.write(self.token, out["data"], meta, trigger, t0, owner=self.owner,
                                              expect=self.version)
        except StoreError as e:
            self._store_failed(e, trigger)
            return None
        except (MemoryOpFailed, OSError, MemoryUnavailable) as e:
            self.memories.metrics.inc_memory_failure("save")
            log.warning("memory %s… %s save failed: %s", self.token.id[:8], trigger, e)
            return None
        if saved.version is not None:
            self.version = saved.version
        self.saves += 1
        return saved

    def _store_failed(self, e: StoreError, trigger: str) -> None:
        self.memories.metrics.inc_memory_failure(e.label)
        refusal = _NEW_MEMORY_REFUSED.get(type(e)) if self.version is None else None
        if isinstance(e, StaleWrite):
            self.stopped = True
            log.warning("memory %s… %s save refused as stale (deleted, or saved by another conversation since "
                        "this one read it): %s; no more saves", self.token.id[:8], trigger, e)
        elif refusal is not None:
            self.stopped, self.refusal = True, refusal
            log.warning("memory %s… new memory refused by the store (%s): %s", self.token.id[:8], e.label, e)
        else:
            log.warning("memory %s… %s save failed: %s", self.token.id[:8], trigger, e)

    async def finish(self, heard: bool = True) -> None:
        """The conversation ended: waits for a running checkpoint, then saves every frame heard (nothing when it
        heard no frame: what is stored already holds everything)."""
        if self._checkpoint is not None:
            await asyncio.gather(self._checkpoint, return_exceptions=True)
        if self.slot is not None and heard:
            await self.save("end", final=True)

    def forget(self) -> None:
        """The conversation is over on this instance (idempotent)."""
        self.memories.release(self.token.id)

"""Conversation memory on the web side: the store, the tokens, and one conversation's saves and restore.

The model side (`slot_memory`, in the model worker) turns a slot's fast weights into memory file bytes and
back; this side seals and stores them (`MemoryStore`, on a thread: never on the event loop, never on the
step path). A conversation that asked for memory (`?memory=1`) gets a `Token` (id + 256-bit key, sent to
the client, never stored); one that resumes (`?resume=TOKEN`) is restored from its memory and gets a new
token for the same id (the memory is re-sealed with the new key as soon as it is sent: the old token stops
working).
Its memory is saved every `save_every` chunks (`checkpoint`) and when it ends (`final`).

Every failure of a token (malformed, unknown id, wrong key, tampered, expired, deleted, in use on this
instance) is the same refusal for the client (`Reason.MEMORY_UNAVAILABLE`); the real cause goes to the
log and to the failures metric.
"""

from __future__ import annotations

import asyncio
import logging
import time
import typing as tp
from dataclasses import dataclass

from moshi_ttt.memory.header import header
from moshi_ttt.memory.seal import MemoryUnavailable, Token
from moshi_ttt.memory.store import MemoryStore, Saved

from ..core.engine_api import ServingEngine
from ..metrics import Metrics

log = logging.getLogger("moshi_ttt.server.memory")

DEFAULT_SAVE_EVERY = 4  # chunks between checkpoints
SAVE_TIMEOUT_S = 30.0  # one save (worker + seal + write) or restore; also how long shutdown waits for saves


class MemoryOpFailed(RuntimeError):
    """A save or restore that did not complete; the message is for the log."""


@dataclass(frozen=True)
class MemoryConfig:
    save_every: int = DEFAULT_SAVE_EVERY  # chunks; 0 = only when the conversation ends
    chunk_size: int = 16  # frames per chunk (the TTT config's)
    timeout: float = SAVE_TIMEOUT_S


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
    model's `fingerprint`, the ids of the conversations remembered on this instance now (`live`) and those
    deleted while live (their saves stop)."""

    def __init__(self, store: MemoryStore, fingerprint: str, metrics: Metrics, cfg: MemoryConfig):
        self.store, self.fingerprint, self.metrics, self.cfg = store, fingerprint, metrics, cfg
        self.live: set[str] = set()
        self.deleted: set[str] = set()
        self.versions: dict[str, str] = {}  # id → the stored version a resume read (its first save's `expect`)

    def expires(self) -> float:
        return time.time() + self.store.ttl

    async def open(self, token_text: str) -> tuple[Token, bytes]:
        """The token and memory file bytes of a resume; `MemoryUnavailable` for any failure (logged and
        counted by the caller through `refused`)."""
        token = Token.parse(token_text)
        if token.id in self.live:
            raise MemoryUnavailable("in use: a conversation on this instance holds it", "in_use")
        t0 = time.perf_counter()
        opened = await asyncio.to_thread(self.store.open, token, self.fingerprint)
        data = await asyncio.to_thread(self.store.read, opened)
        self.versions[token.id] = opened.version
        self.metrics.observe_memory_read(time.perf_counter() - t0, len(data))
        return token, data

    def refused(self, e: MemoryUnavailable, peer: str, what: str) -> None:
        self.metrics.inc_memory_failure(e.label)
        log.warning("memory %s from %s refused: %s", what, peer, e.cause)

    async def write(self, token: Token, data: bytes, meta: dict, trigger: str, t0: float,
                    expect: str | None) -> Saved:
        """Seals and stores `data` (thread) over the stored version `expect` (None: a new memory); returns
        the expiry and new version. Counts the save (`trigger`: checkpoint, end, resume) with its seconds
        since `t0` (perf_counter) and bytes."""
        saved = await asyncio.to_thread(self.store.save, token, self.fingerprint, data, meta, owner="",
                                        expect=expect)
        self.metrics.observe_memory_save(trigger, time.perf_counter() - t0, len(data))
        return saved

    async def delete(self, token_text: str, memory_id: str, peer: str) -> bool:
        """`DELETE /api/memory/{id}`: True if `token_text` opens memory `memory_id` and it was removed."""
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


class ConversationMemory:
    """One conversation's memory: its `token` (the current one), `frames` restored (0 for a new memory), the
    memory it continues, saves one at a time."""

    def __init__(self, memories: Memories, engine: ServingEngine, token: Token, resumed_frames: int | None = None):
        self.memories, self.engine, self.token = memories, engine, token
        self.resumed_frames = resumed_frames
        self.slot = self.conv_id = None
        self._lock = asyncio.Lock()
        self._checkpoint: asyncio.Task | None = None
        self._next: Token | None = None  # a resume's new token, until `rotate`
        self._data: bytes | None = None
        self.version = memories.versions.pop(token.id, None)  # the stored version the next save replaces
        self.saves = 0
        memories.live.add(token.id)

    @property
    def resumed(self) -> bool:
        return self.resumed_frames is not None

    def attach(self, slot: tp.Any, conv_id: int) -> None:
        self.slot, self.conv_id = slot, conv_id

    async def restore(self, data: bytes) -> dict:
        """Into the attached slot (claimed, reset, not stepped). Returns the restored {"frames", "telemetry"};
        `MemoryOpFailed` on failure. The new token (`message`) takes over at `rotate`."""
        t0 = time.perf_counter()
        out = await engine_call(self.engine.restore_memory, self.slot, self.conv_id, data,
                                timeout=self.memories.cfg.timeout)
        self.resumed_frames = int(out["frames"])
        self.memories.metrics.observe_memory_restore(time.perf_counter() - t0, len(data))
        self._next, self._data = Token.new(self.token.id), data
        return out

    async def rotate(self) -> None:
        """Once the client was sent the new token: the memory is re-sealed with its key (the old token stops
        working) and every later save uses it."""
        if self._next is None:
            return
        self.token, data, self._next, self._data = self._next, self._data, None, None
        head = header(data)
        meta = {"frames": self.resumed_frames, "chunks": int(head["chunks"]), "compression": head["compression"]}
        try:
            self.version = (await self.memories.write(self.token, data, meta, "resume", time.perf_counter(),
                                                      self.version)).version
        except OSError as e:
            self.memories.metrics.inc_memory_failure("save")
            log.warning("memory %s… re-seal with the new token failed: %s", self.token.id[:8], e)

    def message(self, expires: float) -> dict:
        """The 0x04 `memory` object."""
        token = self._next or self.token
        body = {"id": token.id, "token": str(token), "expires": round(expires, 3)}
        if self.resumed:
            body.update(resumed=True, frames=self.resumed_frames)
        return {"memory": body}

    def frames_processed(self, frames: int) -> None:
        """The conversation's output frame count (one per input frame): a checkpoint every `save_every` chunks."""
        every = self.memories.cfg.save_every * self.memories.cfg.chunk_size
        if every > 0 and frames % every == 0 and (self._checkpoint is None or self._checkpoint.done()):
            self._checkpoint = asyncio.create_task(self.save("checkpoint"), name="memory-checkpoint")

    async def save(self, trigger: str, final: bool = False) -> bool:
        """Saves the slot's memory now (`final`: after the frames it has queued); False (logged, counted) if
        it could not be saved."""
        async with self._lock:
            if self.token.id in self.memories.deleted:
                return False
            t0 = time.perf_counter()
            try:
                out = await engine_call(self.engine.save_memory, self.slot, self.conv_id, final=final,
                                        timeout=self.memories.cfg.timeout)
                meta = {k: out[k] for k in ("frames", "chunks", "compression")}
                self.version = (await self.memories.write(self.token, out["data"], meta, trigger, t0,
                                                          self.version)).version
            except (MemoryOpFailed, OSError, MemoryUnavailable) as e:
                self.memories.metrics.inc_memory_failure("save")
                log.warning("memory %s… %s save failed: %s", self.token.id[:8], trigger, e)
                return False
            self.saves += 1
            return True

    async def finish(self) -> None:
        """The conversation ended: waits for a running checkpoint, then saves every frame heard."""
        if self._checkpoint is not None:
            await asyncio.gather(self._checkpoint, return_exceptions=True)
        if self.slot is not None:
            await self.save("end", final=True)

    def forget(self) -> None:
        """The conversation is over on this instance (idempotent)."""
        self.memories.live.discard(self.token.id)
        self.memories.deleted.discard(self.token.id)

"""One websocket conversation: claims an engine slot, then receives and sends concurrently.

recv: client messages → charged to the connection's budget (`limits`) → validated (`protocol.parse`)
      → Ogg Opus decoded to PCM → 1920-sample frames pushed to the engine slot.
send: engine events → PCM encoded to Ogg Opus (0x01), text pieces (0x02), and only with `telemetry`
      (`?telemetry=1`) the info message and the TTT telemetry (0x04); with conversation memory
      (`?memory=1`, `?resume=TOKEN`, see `memories`) one 0x04 {"memory": ...} after the handshake, and a
      checkpoint of the memory every `--memory-save-every` chunks.
watchdog: idle timeout (no audio for `idle_timeout` s once the audio received so far is processed)
          and server shutdown.

Whichever of the three finishes first ends the conversation; a server-side end sends 0x05 with the
reason and then closes the websocket; the slot is released in every case (`finally`), after the final
save of a remembered conversation (however it ended, bounded by the memory timeout). A resume's token is
checked against the stored header and its id marked in use before anything else (`Memories.open`); then
admission and the slot claim; only then is the body read (while the slot resets), restored into the slot, and
the handshake sent. Its client confirms the new token with a 0x04 (`protocol.memory_confirmation`), answered
with a 0x04 (`ConversationMemory.confirm`, on its own task: the audio keeps flowing). A client that
broke a budget, or that was refused (busy, overloaded), is not waited for: its connection is closed
right after the close frame, so it cannot keep the event loop busy during a close handshake.

Overload: one batched step serves every conversation, so the server is behind real time when its
step time (EMA) exceeds the frame duration. While it is, and some conversation's audio has waited
more than `admit_lag`, new conversations are refused ("server overloaded"). A conversation whose
audio waits longer than `max_delay` is ended with "server overloaded" — unless the client itself
sent audio faster than real time, which is then named.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import typing as tp
from dataclasses import dataclass, field

import aiohttp
import numpy as np
import sphn
from aiohttp import web

from moshi_ttt.memory.seal import MemoryUnavailable, Token

from ..core.engine_api import ServingEngine
from ..core.events import EngineClosed, Event, EventKind
from ..core.reasons import Reason, busy
from ..guards.admission import address_group
from ..guards.limits import Budget, ConnectionBudget
from ..memory.memories import ConversationMemory, Memories, MemoryOpFailed
from ..metrics import Metrics
from . import protocol

log = logging.getLogger("moshi_ttt.server.session")


@dataclass
class SessionConfig:
    idle_timeout: float = 10.0  # seconds without audio before the server ends the conversation
    max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES
    ready_timeout: float = 30.0  # claim → slot reset by the engine
    max_output_backlog: int = 250  # output frames waiting for a client that does not read (20 s)
    max_delay: float = 20.0  # seconds of input audio waiting for the engine before the conversation ends
    admit_lag: float = 1.0  # refuse new conversations while behind and a queued frame waited this long
    budget: Budget = field(default_factory=Budget)
    refused_close_wait: float = 0.2  # seconds a refused / over-budget client gets to answer our close frame
    # a refused resume is answered this many seconds after its token was taken up, whatever the cause, so that
    # its timing does not tell an unknown id from a wrong key (the measured difference: docs/memory.md)
    memory_refusal_floor: float = 0.25


@dataclass
class End:
    """Why a conversation ended. `reason` None ⇒ the client closed it (no 0x05 is sent); else the 0x05 says
    `reason.says(says)` and the close code is `reason.close` unless `close` overrides it."""

    reason: Reason | None = None
    says: str = ""  # the message's detail after the reason's head
    close: int | None = None
    detail: str = ""  # for the log only
    hostile: bool = False  # over a budget: close without waiting for the client's close frame

    @property
    def error(self) -> str | None:
        return None if self.reason is None else self.reason.says(self.says)

    @property
    def code(self) -> int:
        if self.close is not None:
            return self.close
        return aiohttp.WSCloseCode.OK if self.reason is None else self.reason.close


class Session:
    def __init__(self, ws: web.WebSocketResponse, engine: ServingEngine, metrics: Metrics, cfg: SessionConfig,
                 peer: str = "?", info: dict | None = None, telemetry: bool = False,
                 on_claimed: tp.Callable[[], None] | None = None, drop_input: tp.Callable[[], None] | None = None,
                 memories: Memories | None = None, remember: bool = False, resume: str | None = None,
                 on_memory_refused: tp.Callable[[], None] | None = None):
        self.ws = ws
        self.engine = engine
        self.metrics = metrics
        self.cfg = cfg
        self.peer = peer
        self.info = info or {}
        self.telemetry = telemetry  # send 0x04 info + TTT telemetry (moshi's own server never sends 0x04)
        self.on_claimed = on_claimed
        self.drop_input = drop_input  # stops parsing the client's bytes (refused / over-budget clients)
        self.budget = ConnectionBudget(cfg.budget, min_bytes=cfg.max_message_bytes)
        self.first_audio: float | None = None
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.conv_id: int | None = None
        self.slot = None
        self.frames_in = 0
        self.frames_out = 0
        self.last_audio = time.monotonic()
        self.last_output = 0.0
        self._shutdown: asyncio.Future[None] = self.loop.create_future()
        self.started = time.monotonic()
        self.end: End | None = None  # how the conversation ended (None: refused, or still running)
        self.memories = memories
        self.remember = remember or resume is not None
        self.resume = resume
        self.on_memory_refused = on_memory_refused
        self.memory: ConversationMemory | None = None
        self._body: asyncio.Task | None = None  # a resume's memory body, read once the slot is claimed
        self._confirming: asyncio.Task | None = None  # a confirmation of a resume's new token being processed
        self.served = False  # the handshake was sent

    @property
    def abusive(self) -> bool:
        """The conversation was cut for abuse: over a budget, or audio sent faster than the server allows."""
        return self.end is not None and (self.end.hostile or self.end.code == aiohttp.WSCloseCode.POLICY_VIOLATION)

    # -- entry points --------------------------------------------------------------------------------

    def shutdown(self) -> None:
        if not self._shutdown.done():
            self._shutdown.set_result(None)

    def _sink(self, event: Event) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            if self._body is not None and not self._body.done():
                self._body.cancel()
            if self.memory is not None:
                self.memory.forget()

    async def _open_memory(self) -> bool:
        """The conversation's memory: a new token, or the resumed one checked against its stored header (off the
        event loop) and its id marked in use here. False: the resume was refused (the one 0x05 text; the cause is
        logged)."""
        owner = address_group(self.peer)  # the store's quota owner
        if self.resume is None:
            self.memory = ConversationMemory(self.memories, self.engine, Token.new(), owner)
            return True
        t0 = time.monotonic()
        try:
            opened = await self.memories.open(self.resume)
        except MemoryUnavailable as e:
            self.memories.refused(e, self.peer, "resume")
            await asyncio.sleep(max(0.0, t0 + self.cfg.memory_refusal_floor - time.monotonic()))
            if self.on_memory_refused is not None:
                self.on_memory_refused()
            await self._end_with_error(Reason.MEMORY_UNAVAILABLE.says(), Reason.MEMORY_UNAVAILABLE.close,
                                       wait=self.cfg.refused_close_wait)
            return False
        self.memory = ConversationMemory(self.memories, self.engine, opened.token, owner, opened)
        return True

    async def _run(self) -> None:
        if self.remember and not await self._open_memory():
            return
        behind = self.metrics.behind_real_time()
        if behind is not None and self.engine.oldest_wait() > self.cfg.admit_lag:
            refusal = Reason.OVERLOADED_AT_START
            self.metrics.rejected_conversation(refusal.label)
            log.warning("conversation from %s refused: %s (%s)", self.peer, refusal.head, behind)
            await self._end_with_error(refusal.says(f"{behind}; try again later"), refusal.close,
                                       wait=self.cfg.refused_close_wait)
            return
        try:
            claimed = self.engine.claim(self._sink)
        except EngineClosed as e:
            await self._end_with_error(Reason.UNAVAILABLE.says(str(e)), Reason.UNAVAILABLE.close)
            return
        if claimed is None:
            self.metrics.rejected_conversation(Reason.BUSY.label)
            log.info("conversation from %s refused: %s (%d/%d slots in use)", self.peer, Reason.BUSY.head,
                     self.engine.active_count(), self.engine.n)
            await self._end_with_error(busy(self.engine.n), Reason.BUSY.close, wait=self.cfg.refused_close_wait)
            return
        self.slot, self.conv_id = claimed
        if self.memory is not None:
            self.memory.attach(self.slot, self.conv_id)
            if self.memory.resumed:  # the body is read while the slot resets
                self._body = asyncio.create_task(self.memories.read(self.memory.opened), name="memory-read")
        if self.on_claimed is not None:
            self.on_claimed()
        self.metrics.conversation_started()
        tag = f"conversation #{self.conv_id} (slot {self.slot.index}, {self.peer})"
        end = End(Reason.INTERNAL)
        try:
            end = await self._serve(tag)
        except asyncio.CancelledError:
            end = End(Reason.SHUTTING_DOWN)
            raise
        except ConnectionError as e:
            end = End(detail=f"connection lost ({type(e).__name__})")
        except Exception as e:  # one conversation's bug must not take the server down
            log.exception("%s: unexpected error", tag)
            end = End(Reason.INTERNAL, type(e).__name__)
        finally:
            if self.memory is not None and self.served and end.reason is not Reason.WORKER_RESTARTED:
                try:  # every frame heard, before the slot is released (bounded by the memory timeout)
                    if self._confirming is not None:
                        await asyncio.gather(asyncio.shield(self._confirming), return_exceptions=True)
                    await asyncio.shield(self.memory.finish(heard=self.frames_in > 0))
                except (Exception, asyncio.CancelledError):
                    log.exception("%s: final memory save failed", tag)
            self.engine.release(self.slot, self.conv_id)
            self.end = end
            dur = time.monotonic() - self.started
            if end.reason is not None:
                self.metrics.inc_error(end.reason.label)
                log.warning("%s ended after %.1f s, %d frames in / %d out: %s%s", tag, dur, self.frames_in,
                            self.frames_out, end.error, f" ({end.detail})" if end.detail else "")
                wait = self.cfg.refused_close_wait if end.hostile else None
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._end_with_error(end.error, end.code, wait=wait))
            else:
                log.info("%s ended by the client after %.1f s, %d frames in / %d out%s", tag, dur,
                         self.frames_in, self.frames_out, f" ({end.detail})" if end.detail else "")
                with contextlib.suppress(Exception):
                    await self.ws.close()

    async def _serve(self, tag: str) -> End:
        try:
            ev = await asyncio.wait_for(self.events.get(), self.cfg.ready_timeout)
        except asyncio.TimeoutError:
            return End(Reason.OVERLOADED, "slot not ready in time")
        if ev.kind is EventKind.ERROR:
            return _engine_end(ev)
        assert ev.kind is EventKind.READY, ev.kind
        if self._body is not None:
            try:
                data = await self._body
            except MemoryUnavailable as e:
                self.memories.refused(e, self.peer, "resume")
                return End(Reason.MEMORY_UNAVAILABLE)
            self._body = None
            try:
                out = await self.memory.restore(data)
            except (MemoryOpFailed, OSError, MemoryUnavailable) as e:
                self.memories.refused(MemoryUnavailable(f"restore failed: {e}", "restore_failed"), self.peer,
                                      "resume")
                return End(Reason.MEMORY_UNAVAILABLE)
            del data
            ev = Event(EventKind.TELEMETRY, telemetry=out["telemetry"], frame=0)
            log.info("%s resumed memory %s… (%d frames heard before)", tag, self.memory.token.id[:8],
                     self.memory.resumed_frames)
        await self.ws.send_bytes(protocol.handshake())
        self.served = True
        if self.memory is not None:
            await self.ws.send_bytes(protocol.metadata(self.memory.message(self.memories.expires())))
        if self.telemetry:
            await self.ws.send_bytes(protocol.metadata({"type": "info", "conversation": self.conv_id,
                                                        "slot": self.slot.index, **self.info}))
        await self._send_telemetry(ev)
        log.info("%s started", tag)
        self.last_audio = time.monotonic()
        tasks = [asyncio.create_task(self._recv(), name="recv"), asyncio.create_task(self._send(), name="send"),
                 asyncio.create_task(self._watchdog(), name="watchdog")]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        task = next(t for t in tasks if t in done)
        exc = task.exception()
        if exc is not None:
            raise exc
        return task.result()

    # -- the three loops ---------------------------------------------------------------------------------

    async def _recv(self) -> End:
        reader = sphn.OpusStreamReader(self.engine.sample_rate)
        pending = np.zeros(0, dtype=np.float32)
        fs = self.engine.frame_size
        max_backlog = max(1, round(self.cfg.max_delay / self.engine.frame_seconds))
        async for msg in self.ws:  # autoping is off: PING/PONG frames arrive here and are charged too
            control = msg.type in (aiohttp.WSMsgType.PING, aiohttp.WSMsgType.PONG)
            if control or msg.type in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT):
                over = self.budget.charge(len(msg.data) if msg.data else 0, control=control)
                if over is not None:
                    self.metrics.inc_over_budget(over[0].label)
                    return End(*over, hostile=True)
            if msg.type == aiohttp.WSMsgType.PING:
                await self.ws.pong(msg.data)
                continue
            if msg.type == aiohttp.WSMsgType.ERROR:
                # aiohttp has already closed the connection (e.g. 1009 above its hard size limit).
                err = msg.data if msg.data is not None else self.ws.exception()
                return End(Reason.WEBSOCKET_ERROR, str(err), close=getattr(err, "code", None))
            if msg.type == aiohttp.WSMsgType.TEXT:
                return End(Reason.PROTOCOL_ERROR, "text websocket frames are not part of the protocol (send binary "
                           "messages)", close=aiohttp.WSCloseCode.UNSUPPORTED_DATA)
            if msg.type != aiohttp.WSMsgType.BINARY:
                continue
            try:
                m = protocol.parse(msg.data, self.cfg.max_message_bytes)
            except protocol.ProtocolError as e:
                return End(Reason.PROTOCOL_ERROR, e.reason, close=e.close_code)
            if m.kind == protocol.Kind.METADATA and self.memory is not None:  # else ignored, as moshi does
                try:
                    await self._client_metadata(protocol.client_metadata(m.payload))
                except protocol.ProtocolError as e:
                    return End(Reason.PROTOCOL_ERROR, e.reason, close=e.close_code)
                continue
            if m.kind != protocol.Kind.AUDIO:
                log.debug("ignoring client message kind %s (%d bytes)", m.kind.name, len(m.payload))
                continue
            if not m.payload:
                continue
            try:
                pcm = reader.append_bytes(m.payload)
            except Exception as e:  # sphn raises ValueError/RuntimeError for bad streams
                return End(Reason.INVALID_AUDIO, f"not an Ogg Opus stream ({e})")
            self.last_audio = time.monotonic()
            if self.first_audio is None:
                self.first_audio = self.last_audio
            pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
            if pcm.size == 0:
                continue
            if not np.isfinite(pcm).all():
                pcm = np.nan_to_num(pcm, nan=0.0, posinf=0.0, neginf=0.0)
            pending = np.concatenate([pending, pcm]) if pending.size else pcm
            n = pending.size // fs
            if n:
                frames = [pending[i * fs:(i + 1) * fs].copy() for i in range(n)]
                pending = pending[n * fs:]
                self.frames_in += n
                if self.engine.queued_frames(self.slot) + n > max_backlog:
                    return self._backlog_end(max_backlog)
                if not self.engine.push(self.slot, self.conv_id, frames):
                    return End(Reason.INTERNAL, "conversation slot lost")
        # The loop ends when the client closes (CLOSE/CLOSING/CLOSED); a partial frame is dropped.
        if pending.size:
            return End(detail=f"closed mid-frame, {pending.size} samples dropped")
        return End()

    async def _send(self) -> End:
        writer = sphn.OpusStreamWriter(self.engine.sample_rate)
        while True:
            ev = await self.events.get()
            if ev.kind is EventKind.FRAME:
                ogg = writer.append_pcm(ev.pcm)
                self.frames_out += 1
                if self.memory is not None:
                    self.memory.frames_processed(self.frames_out)
                self.last_output = time.monotonic()
                if len(ogg):
                    await self.ws.send_bytes(protocol.audio(bytes(ogg)))
                if ev.text:
                    await self.ws.send_bytes(protocol.text(ev.text))
            elif ev.kind is EventKind.TELEMETRY:
                await self._send_telemetry(ev)
            elif ev.kind is EventKind.ERROR:
                return _engine_end(ev)

    async def _watchdog(self) -> End:
        tick = max(0.05, min(1.0, self.cfg.idle_timeout / 4)) if self.cfg.idle_timeout > 0 else 1.0
        while True:
            try:
                await asyncio.wait_for(asyncio.shield(self._shutdown), tick)
                return End(Reason.SHUTTING_DOWN)
            except asyncio.TimeoutError:
                pass
            # A client that stops reading blocks the send loop in drain: its replies pile up here.
            if self.events.qsize() > self.cfg.max_output_backlog:
                return End(Reason.CLIENT_TOO_SLOW, f"{self.events.qsize()} output frames waiting")
            if self.memory is not None and self.memory.refusal is not None:  # the store refused the new memory
                return End(self.memory.refusal)
            # Idle = no audio from the client and nothing of its audio left to process.
            idle = time.monotonic() - max(self.last_audio, self.last_output)
            if self.cfg.idle_timeout > 0 and idle > self.cfg.idle_timeout:
                return End(Reason.IDLE, f"no audio received for {self.cfg.idle_timeout:g} s")

    # -- helpers -----------------------------------------------------------------------------------------

    async def _client_metadata(self, obj: dict) -> None:
        """A client 0x04 object of a remembered conversation: a confirmation of a resume's new token (answered on
        its own task), or ignored."""
        try:
            token = protocol.memory_confirmation(obj)
        except ValueError as e:
            await self._memory_answer({"memory": {"error": str(e)}})
            return
        if token is None:
            log.debug("ignoring a client 0x04 object with keys %s", sorted(obj)[:5])
            return
        if self._confirming is not None and not self._confirming.done():
            await self._memory_answer({"memory": {"error": "a confirmation is already being processed"}})
            return

        async def confirm() -> None:
            await self._memory_answer(await self.memory.confirm(token))
        self._confirming = asyncio.create_task(confirm(), name="memory-confirm")

    async def _memory_answer(self, body: dict) -> None:
        if "error" in body["memory"]:
            log.debug("memory confirmation from %s refused: %s", self.peer, body["memory"]["error"])
        with contextlib.suppress(ConnectionError, RuntimeError):  # the client is gone: nothing to answer
            await self.ws.send_bytes(protocol.metadata(body))

    def _backlog_end(self, max_backlog: int) -> End:
        """More than `max_delay` of audio waits for the engine: whose fault is it? A client at 1× has sent
        about as much audio as time passed since its first audio; then the engine is behind."""
        fsec = self.engine.frame_seconds
        ahead = self.frames_in * fsec - (time.monotonic() - (self.first_audio or self.started))
        waiting = f"{max_backlog * fsec:g} s of audio waiting"
        if ahead > self.cfg.max_delay / 2:
            return End(Reason.TOO_FAST, f"{waiting} (the client sends faster than real time: {ahead:.1f} s ahead of "
                                        "the clock)")
        behind = self.metrics.behind_real_time() or "it cannot keep up with real time"
        return End(Reason.OVERLOADED, f"{waiting} ({behind})")

    async def _send_telemetry(self, ev: Event) -> None:
        if not ev.telemetry or not self.telemetry:
            return
        await self.ws.send_bytes(protocol.metadata({
            "type": "ttt", "conversation": self.conv_id, "frames": ev.frame,
            "seconds": round(ev.frame * self.engine.frame_seconds, 3), "layers": ev.telemetry}))

    async def _end_with_error(self, reason: str, code: int, wait: float | None = None) -> None:
        """0x05 + close frame. `wait`: seconds the client gets to answer the close frame (None: the
        websocket's own close timeout); then the connection is closed regardless."""
        if self.ws.closed:
            return
        if wait is not None and self.drop_input is not None:
            self.drop_input()
        with contextlib.suppress(Exception):  # a client that does not read must not hang us here
            await asyncio.wait_for(self.ws.send_bytes(protocol.error(reason)), 5 if wait is None else 1)
        with contextlib.suppress(Exception):
            # aiohttp closes the transport when the wait is cut short (abnormal closure on our side).
            await asyncio.wait_for(self.ws.close(code=code, message=reason.encode("utf-8")[:120]),
                                   10 if wait is None else wait)


def _engine_end(ev: Event) -> End:
    """The end of a conversation whose engine reported an error (always closed as an internal error)."""
    return End(ev.reason or Reason.INTERNAL, ev.detail, close=Reason.INTERNAL.close)


def peer_of(request: web.Request) -> str:
    peer = request.remote or "?"
    return str(peer)


__all__: tp.Sequence[str] = ["Session", "SessionConfig", "End", "peer_of"]

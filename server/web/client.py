"""A small asyncio client for Moshi's websocket protocol (tests, benchmarks, scripts).

    async with aiohttp.ClientSession() as http:
        conv = await ChatClient.connect(http, "ws://localhost:8998/api/chat")
        await conv.send_pcm(pcm)            # float32 24 kHz mono, encoded to Ogg Opus 80 ms pages
        await conv.wait_output_frames(n)    # decoded reply audio, in 1920-sample frames
        await conv.close()

Received messages are collected by a background task: `pcm` (decoded reply), `text` pieces (and `text_times`,
when each arrived), `metadata` (JSON objects), `errors` (0x05 reasons), `kinds` (the order of message kinds).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import typing as tp

import aiohttp
import numpy as np
import sphn

from moshi_ttt.models.streams import FRAME, SAMPLE_RATE

from . import protocol


class HandshakeError(RuntimeError):
    """The server ended the connection (or sent an error) instead of the 0x00 handshake."""


class ChatClient:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse, sample_rate: int = SAMPLE_RATE):
        self.ws = ws
        self.sample_rate = sample_rate
        self.writer = sphn.OpusStreamWriter(sample_rate)
        self.reader = sphn.OpusStreamReader(sample_rate)
        self.kinds: list[protocol.Kind] = []
        self.chunks: list[np.ndarray] = []
        self.n_samples = 0
        self.audio_times: list[tuple[float, int]] = []  # (monotonic time, total samples) per audio message
        self.text: list[str] = []
        self.text_times: list[float] = []  # monotonic time each text piece arrived
        self.metadata: list[dict] = []
        self.errors: list[str] = []
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None

    @classmethod
    async def connect(cls, http: aiohttp.ClientSession, url: str, api_key: str | None = None,
                      handshake_timeout: float = 30.0, telemetry: bool = False, memory: bool = False,
                      resume: str | None = None) -> ChatClient:
        """`telemetry`: ask for the 0x04 info and TTT telemetry messages (`?telemetry=1`); `memory`: keep the
        conversation's memory (`?memory=1`); `resume`: continue the memory of this token (`?resume=TOKEN`)."""
        headers = {"X-API-Key": api_key} if api_key else None
        params = {k: v for k, v in ((protocol.TELEMETRY_QUERY, "1" if telemetry else None),
                                    (protocol.MEMORY_QUERY, "1" if memory else None),
                                    (protocol.RESUME_QUERY, resume)) if v is not None} or None
        ws = await http.ws_connect(url, headers=headers, params=params, max_msg_size=0, autoping=True)
        self = cls(ws)
        try:
            msg = await asyncio.wait_for(ws.receive(), handshake_timeout)
        except asyncio.TimeoutError:
            await ws.close()
            raise HandshakeError("no handshake within the timeout") from None
        if msg.type != aiohttp.WSMsgType.BINARY:
            self.close_code = ws.close_code
            raise HandshakeError(f"expected a binary handshake, got {msg.type.name} (close code {ws.close_code})")
        kind, payload = protocol.decode_server_message(msg.data)
        self.kinds.append(kind)
        if kind != protocol.Kind.HANDSHAKE:
            if kind == protocol.Kind.ERROR:
                self.errors.append(payload)
            # Drain to the close so callers can read the close code.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.receive(), 5)
            self.close_code = ws.close_code
            raise HandshakeError(f"expected the 0x00 handshake, got {kind.name}: {payload!r}")
        self._task = asyncio.create_task(self._recv())
        return self

    @property
    def pcm(self) -> np.ndarray:
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.float32)

    @property
    def output_frames(self) -> int:
        return self.n_samples // FRAME

    def ttt(self) -> list[dict]:
        return [m for m in self.metadata if m.get("type") == "ttt"]

    def memory(self) -> dict | None:
        """The 0x04 `memory` object (id, token, expires; resumed, frames), once received."""
        return next((m["memory"] for m in self.metadata if "memory" in m), None)

    async def _recv(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type != aiohttp.WSMsgType.BINARY:
                    continue
                kind, payload = protocol.decode_server_message(msg.data)
                self.kinds.append(kind)
                if kind == protocol.Kind.AUDIO:
                    pcm = self.reader.append_bytes(payload)
                    if pcm.size:
                        self.chunks.append(np.asarray(pcm, np.float32).reshape(-1))
                        self.n_samples += pcm.size
                        self.audio_times.append((time.monotonic(), self.n_samples))
                elif kind == protocol.Kind.TEXT:
                    self.text.append(payload)
                    self.text_times.append(time.monotonic())
                elif kind == protocol.Kind.METADATA:
                    self.metadata.append(payload)
                elif kind == protocol.Kind.ERROR:
                    self.errors.append(payload)
                self._changed.set()
        finally:
            self.close_code = self.ws.close_code
            self.closed.set()
            self._changed.set()

    async def wait_for(self, pred: tp.Callable[[], bool], timeout: float, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
            if self.closed.is_set():
                if pred():
                    return
                raise ConnectionError(f"connection closed (code {self.close_code}, errors {self.errors}) "
                                      f"while waiting for {what}")
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))

    async def wait_output_frames(self, n: int, timeout: float = 30.0) -> None:
        await self.wait_for(lambda: self.output_frames >= n, timeout, f"{n} output frames")

    async def wait_closed(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self.closed.wait(), timeout)

    async def send_ogg(self, ogg: bytes) -> None:
        await self.ws.send_bytes(protocol.audio(ogg))

    async def send_pcm(self, pcm: np.ndarray, realtime: float = 0.0, frame: int = FRAME) -> int:
        """Encodes `pcm` (zero-padded to whole frames) in pages of `frame` samples and sends them.
        `realtime` > 0 paces the pages at that multiple of real time. Returns frames sent."""
        pcm = np.asarray(pcm, np.float32).reshape(-1)
        if pcm.size % frame:
            pcm = np.concatenate([pcm, np.zeros(frame - pcm.size % frame, np.float32)])
        t0 = time.monotonic()
        n = pcm.size // frame
        for i in range(n):
            ogg = self.writer.append_pcm(pcm[i * frame:(i + 1) * frame])
            if len(ogg):
                await self.send_ogg(bytes(ogg))
            if realtime > 0:
                due = t0 + (i + 1) * frame / self.sample_rate / realtime
                await asyncio.sleep(max(0.0, due - time.monotonic()))
        return n

    async def confirm_memory(self, token: str | None = None, timeout: float = 10.0) -> dict:
        """A resumed conversation: confirms its new token (`token`, default the memory message's) with a client
        0x04 and returns the server's answer, the `memory` object of {"confirmed": true, ...} or {"error": ...}."""
        seen = len(self.metadata)
        token = self.memory()["token"] if token is None else token
        await self.ws.send_bytes(protocol.metadata({"memory": {protocol.MEMORY_CONFIRM: token}}))

        def answer() -> dict | None:
            return next((m["memory"] for m in self.metadata[seen:] if isinstance(m.get("memory"), dict)
                         and ("confirmed" in m["memory"] or "error" in m["memory"])), None)
        await self.wait_for(lambda: answer() is not None, timeout, "the answer to the memory confirmation")
        return answer()

    async def send_raw(self, data: bytes | str) -> None:
        if isinstance(data, str):
            await self.ws.send_str(data)
        else:
            await self.ws.send_bytes(data)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 5)

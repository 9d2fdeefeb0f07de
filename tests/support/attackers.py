"""Hostile clients of a running `moshi-ttt serve`, run in their own spawned process so that their CPU never
shares the measuring client's GIL (tests/e2e/test_isolation.py). Every attacker is a thread on raw
sockets, bound to its own source address (127.0.0.x) where asked, and loops until the stop time.

Kinds: "reconnect" (upgrade; when accepted, 1-byte messages as fast as the socket drains until cut;
reconnect at once, also when refused), "pings" (the same with websocket PING frames), "audio3x" (a real
client streaming speech at 3× real time, reconnecting when cut), "pipelining" (100k pipelined
`GET /health` on one connection), "headers" (requests with huge header blocks), "slowloris" (many
connections sending their request head one byte a second).
"""

from __future__ import annotations

import multiprocessing
import socket
import threading
import time

from .probe import host_port, ws_frame

UPGRADE = ("GET /api/chat HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def _connect(url: str, source: str | None, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(host_port(url), timeout=timeout,
                                    source_address=(source, 0) if source else None)


def _reconnect_flood(url: str, source: str | None, stop_at: float, frame: bytes, counts: dict) -> None:
    host, port = host_port(url)
    blast = frame * 2000
    while time.monotonic() < stop_at:
        try:
            with _connect(url, source) as s:
                s.sendall(UPGRADE.format(host=host, port=port).encode())
                head = s.recv(4096)
                if b" 101 " not in head.split(b"\r\n", 1)[0] + b" ":
                    counts["refused"] = counts.get("refused", 0) + 1
                    continue
                counts["upgraded"] = counts.get("upgraded", 0) + 1
                s.settimeout(2.0)
                while time.monotonic() < stop_at:
                    s.sendall(blast)
        except OSError:
            counts["cut"] = counts.get("cut", 0) + 1


def _send_and_drain(url: str, source: str | None, stop_at: float, counts: dict, data: bytes, **connect) -> None:
    """Until `stop_at`: a new connection sends `data` and reads until the server closes it; one run each."""
    while time.monotonic() < stop_at:
        try:
            with _connect(url, source, **connect) as s:
                s.sendall(data)
                while s.recv(65536):
                    pass
        except OSError:
            pass
        counts["runs"] = counts.get("runs", 0) + 1


def _pipelining(url: str, source: str | None, stop_at: float, counts: dict) -> None:
    host, port = host_port(url)
    data = f"GET /health HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode() * 100_000
    _send_and_drain(url, source, stop_at, counts, data, timeout=10)


def _headers(url: str, source: str | None, stop_at: float, counts: dict) -> None:
    host, port = host_port(url)
    data = (f"GET /health HTTP/1.1\r\nHost: {host}:{port}\r\n" + "".join(f"X-H{i}: {'x' * 100}\r\n"
                                                                      for i in range(600)) + "\r\n").encode()
    _send_and_drain(url, source, stop_at, counts, data)


def _slowloris(url: str, source: str | None, stop_at: float, counts: dict, n: int = 20) -> None:
    host, port = host_port(url)
    head = f"GET /health HTTP/1.1\r\nHost: {host}:{port}\r\nX-Slow: ".encode()
    socks: list[socket.socket] = []
    while time.monotonic() < stop_at:
        while len(socks) < n:
            try:
                s = _connect(url, source)
                s.sendall(head[:1])
                socks.append(s)
                counts["opened"] = counts.get("opened", 0) + 1
            except OSError:
                break
        time.sleep(1.0)
        alive = []
        for s in socks:
            try:
                s.sendall(b"x")
                alive.append(s)
            except OSError:
                s.close()
                counts["closed"] = counts.get("closed", 0) + 1
        socks = alive
    for s in socks:
        s.close()


def _audio3x(url: str, source: str | None, stop_at: float, counts: dict, pcm) -> None:
    import asyncio

    import aiohttp
    from moshi_ttt.server.web.client import ChatClient, HandshakeError

    async def go() -> None:
        ws_url = url.replace("http://", "ws://") + "/api/chat"
        connector = aiohttp.TCPConnector(local_addr=(source, 0)) if source else None
        async with aiohttp.ClientSession(connector=connector) as http:
            while time.monotonic() < stop_at:
                try:
                    c = await ChatClient.connect(http, ws_url)
                except (HandshakeError, aiohttp.ClientError, OSError):
                    counts["refused"] = counts.get("refused", 0) + 1
                    await asyncio.sleep(0.2)
                    continue
                counts["upgraded"] = counts.get("upgraded", 0) + 1
                try:
                    while time.monotonic() < stop_at and not c.closed.is_set():
                        await c.send_pcm(pcm, realtime=3.0)
                except (ConnectionError, aiohttp.ClientError, RuntimeError):
                    pass
                counts["cut"] = counts.get("cut", 0) + int(c.closed.is_set())
                await c.close()

    asyncio.run(go())


def _run(url: str, plan: list[tuple[str, str | None]], seconds: float, pcm, results) -> None:
    stop_at = time.monotonic() + seconds
    threads, counts = [], []
    for kind, source in plan:
        c: dict = {"kind": kind, "source": source}
        counts.append(c)
        if kind in ("reconnect", "pings"):
            frame = ws_frame(2, b"\x06") if kind == "reconnect" else ws_frame(9, b"p")
            target, args = _reconnect_flood, (url, source, stop_at, frame, c)
        elif kind == "audio3x":
            target, args = _audio3x, (url, source, stop_at, c, pcm)
        else:
            target = {"pipelining": _pipelining, "headers": _headers, "slowloris": _slowloris}[kind]
            args = (url, source, stop_at, c)
        threads.append(threading.Thread(target=target, args=args, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    results.put(counts)


class Attack:
    """`with Attack(url, [(kind, source address or None), ...], seconds, pcm):` runs the attackers in a
    spawned process for `seconds`; `counts` (after the block) says what each one did."""

    def __init__(self, url: str, plan: list[tuple[str, str | None]], seconds: float, pcm=None):
        ctx = multiprocessing.get_context("spawn")
        self._results = ctx.Queue()
        self.seconds = seconds
        self.proc = ctx.Process(target=_run, args=(url, plan, seconds, pcm, self._results), daemon=True,
                                name="attackers")
        self.counts: list[dict] = []

    def __enter__(self) -> Attack:
        self.proc.start()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.counts = self._results.get(timeout=self.seconds + 60)
        except Exception:  # noqa: BLE001 — a stuck attacker must not hang the test
            self.counts = []
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()

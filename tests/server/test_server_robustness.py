"""Malformed clients: each offending conversation gets its 0x05 (or is closed) and frees its slot,
while a concurrent good conversation keeps getting audio. Real websocket over loopback, real speech."""

import asyncio
import contextlib
import urllib.request

import aiohttp
import numpy as np
import pytest
from moshi_ttt.server.serve import BackgroundServer
from moshi_ttt.server.web.client import FRAME, ChatClient

from support.observe import health, parse_prometheus, wait_active

MAX_MSG = 4096
IDLE = 1.5


@pytest.fixture(scope="module")
def robust_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("robust_server")
    srv = BackgroundServer(["--demo", "--port", "0", "--cache-dir", str(d / "cache"), "--max-conversations", "2",
                            "--idle-timeout", str(IDLE), "--max-message-bytes", str(MAX_MSG),
                            # this test is about malformed clients: on a machine too slow for real time the
                            # server would (rightly) refuse them as "server overloaded" before they misbehave
                            "--admit-lag", "1e9", "--no-per-ip-limits"])
    yield srv
    srv.stop()


def metrics_text(srv) -> str:
    with urllib.request.urlopen(srv.url + "/metrics", timeout=5) as r:
        return r.read().decode()


async def stream_forever(c: ChatClient, pcm: np.ndarray, stop: asyncio.Event) -> None:
    """Sends `pcm` in a loop at real time, with a ping (0x06, ignored by the server) once per loop."""
    while not stop.is_set():
        await c.send_raw(b"\x06")
        for i in range(0, pcm.size - FRAME + 1, FRAME):
            if stop.is_set():
                return
            await c.send_pcm(pcm[i:i + FRAME], realtime=1.0)


async def abort(c: ChatClient) -> None:
    """Drops the TCP connection without a websocket close."""
    c.ws._conn.transport.abort()
    await asyncio.sleep(0)


CASES = {
    "empty message": (b"", "protocol error: empty message", 1007),
    "unknown kind": (b"\x09hello", "protocol error: unknown message kind 0x09", 1003),
    "text frame": ("hello", "protocol error: text websocket frames", 1003),
    "not ogg opus": (b"\x01" + b"this is not ogg opus at all " * 8, "invalid audio: not an Ogg Opus stream", 1007),
    "over the size limit": (b"\x01" + bytes(MAX_MSG), f"message too large: {MAX_MSG + 1} bytes", 1009),
    # over aiohttp's hard cap (max(16 × limit, 1 MiB)): aiohttp itself closes with 1009, no 0x05
    "over the hard cap": (b"\x01" + bytes(1 << 20), None, 1009),
}


def test_malformed_clients_do_not_disturb_a_good_one(robust_server, server_speech):
    srv = robust_server

    async def go():
        async with aiohttp.ClientSession() as http:
            await wait_active(srv, 0)
            good = await ChatClient.connect(http, srv.ws_url)
            stop = asyncio.Event()
            feeder = asyncio.create_task(stream_forever(good, server_speech["b"], stop))
            await good.wait_output_frames(3, timeout=10)
            progress = []

            async def check_good_advances():
                before = good.output_frames
                await good.wait_output_frames(before + 2, timeout=5)
                progress.append(good.output_frames - before)

            for name, (data, needle, code) in CASES.items():
                bad = await ChatClient.connect(http, srv.ws_url)
                await bad.send_raw(data)
                await bad.wait_closed(5)
                if needle is None:
                    assert not bad.errors, (name, bad.errors)
                else:
                    assert bad.errors and needle in bad.errors[0], (name, bad.errors)
                assert bad.close_code == code, (name, bad.close_code)
                await check_good_advances()
                await wait_active(srv, 1)

            # Disconnect mid-frame: 1.5 frames of audio in 40 ms pages, then the TCP connection drops.
            bad = await ChatClient.connect(http, srv.ws_url)
            await bad.send_pcm(server_speech["a"][: 3 * FRAME // 2], frame=FRAME // 2)
            await abort(bad)
            await wait_active(srv, 1)
            await check_good_advances()

            # A client that never sends audio: idle timeout, 0x05, close.
            idle = await ChatClient.connect(http, srv.ws_url)
            await idle.wait_closed(IDLE + 3)
            assert idle.errors and idle.errors[0].startswith("idle timeout"), idle.errors
            await check_good_advances()
            await wait_active(srv, 1)

            # A good conversation can still be opened alongside, and gets replies.
            other = await ChatClient.connect(http, srv.ws_url)
            n = await other.send_pcm(server_speech["a"][: 12 * FRAME])
            await other.wait_output_frames(n, timeout=20)
            await other.close()

            stop.set()
            await feeder
            assert not good.errors and not good.closed.is_set(), good.errors
            await good.close()
            await wait_active(srv, 0)
            return progress

    progress = asyncio.run(go())
    assert len(progress) == len(CASES) + 2 and all(p >= 2 for p in progress)
    h = health(srv)
    assert h["status"] == "ok" and h["active"] == 0 and h["free"] == 2
    fams = parse_prometheus(metrics_text(srv))
    assert fams["moshi_ttt_conversations_active"] == [({}, 0.0)]
    errors = {lb["reason"]: v for lb, v in fams["moshi_ttt_conversation_errors_total"]}
    assert errors.get("protocol_error") == 4 and errors.get("invalid_audio") == 1 and errors.get("idle_timeout") == 1
    assert errors.get("websocket_error") == 1


def test_server_side_exception_frees_the_slot(tmp_path, server_speech):
    """A failing model step (in the model worker) ends the conversations of that step with a 0x05; the
    slot is freed and the next conversation is served normally."""
    srv = BackgroundServer(["--demo", "--port", "0", "--cache-dir", str(tmp_path / "cache"), "--max-conversations",
                            "2", "--admit-lag", "1e9", "--fail-step", "3"])  # the server's 3rd step raises

    async def go():
        async with aiohttp.ClientSession() as http:
            await wait_active(srv, 0)
            c = await ChatClient.connect(http, srv.ws_url)
            await c.send_pcm(server_speech["a"][: 10 * FRAME])
            await c.wait_closed(10)
            assert c.errors and c.errors[0].startswith("internal error during step"), c.errors
            assert c.output_frames == 2  # the frames before the failure were delivered
            await wait_active(srv, 0)
            c2 = await ChatClient.connect(http, srv.ws_url)
            n = await c2.send_pcm(server_speech["a"][: 10 * FRAME])
            await c2.wait_output_frames(n, timeout=20)
            assert not c2.errors
            await c2.close()
            await wait_active(srv, 0)

    try:
        asyncio.run(go())
    finally:
        srv.stop()


def test_shutdown_ends_conversations_with_an_error(tmp_path, server_speech):
    srv = BackgroundServer(["--demo", "--port", "0", "--cache-dir", str(tmp_path / "cache"),
                            "--max-conversations", "1"])
    try:
        async def go():
            async with aiohttp.ClientSession() as http:
                c = await ChatClient.connect(http, srv.ws_url)
                n = await c.send_pcm(server_speech["a"][: 5 * FRAME])
                await c.wait_output_frames(n, timeout=20)
                await asyncio.to_thread(srv.stop)
                await c.wait_closed(10)
                return c
        c = asyncio.run(go())
    finally:
        srv.stop()
    assert c.errors == ["server shutting down"] and c.close_code == 1001, (c.errors, c.close_code)
    assert not srv.engine.alive


def test_client_flooding_audio_is_stopped(robust_server, server_speech):
    """More than 250 frames (20 s) of audio waiting for the engine ⇒ 0x05 and close, slot freed."""
    srv = robust_server

    async def go():
        async with aiohttp.ClientSession() as http:
            await wait_active(srv, 0)
            c = await ChatClient.connect(http, srv.ws_url)
            pcm = np.tile(server_speech["a"], 4)[: 400 * FRAME]
            with contextlib.suppress(ConnectionError):
                await c.send_pcm(pcm)
            await c.wait_closed(10)
            await wait_active(srv, 0)
            return c
    c = asyncio.run(go())
    assert c.errors and c.errors[0].startswith("too much audio queued"), c.errors
    assert c.close_code == 1008

"""Fault isolation of the model worker process: `kill -9` of the worker ends every live conversation with
0x05 "model worker restarted" at once, /health answers 503 while a new worker starts and 200 after,
no slot leaks, and a new conversation is served within 30 s. Also: the server's default is the split
(the worker is another process), and a clean stop ends the worker with exit code 0."""

import asyncio
import os
import signal
import time
import urllib.error
import urllib.request

import aiohttp
import pytest
from moshi_ttt.server.serve import BackgroundServer
from moshi_ttt.server.web.client import FRAME, ChatClient


@pytest.fixture(scope="module")
def split_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("split_server")
    srv = BackgroundServer(["--demo", "--port", "0", "--cache-dir", str(d / "cache"), "--max-conversations", "3",
                            "--admit-lag", "1e9", "--idle-timeout", "30", "--log-level", "warning"])
    yield srv
    srv.stop()


def status(srv) -> tuple[int, dict]:
    import json

    try:
        with urllib.request.urlopen(srv.url + "/health", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def restarts(srv) -> float:
    with urllib.request.urlopen(srv.url + "/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("moshi_ttt_worker_restarts_total "):
                return float(line.split()[1])
    raise AssertionError("no moshi_ttt_worker_restarts_total")


def test_the_model_runs_in_another_process(split_server):
    pid = split_server.engine.pid
    assert pid is not None and pid != os.getpid()
    assert status(split_server)[0] == 200


def test_kill_9_of_the_worker(split_server, server_speech):
    srv = split_server
    pcm = server_speech["a"]

    async def go():
        async with aiohttp.ClientSession() as http:
            clients = [await ChatClient.connect(http, srv.ws_url) for _ in range(2)]
            for c in clients:
                n = await c.send_pcm(pcm[: 6 * FRAME])
                await c.wait_output_frames(n, timeout=30)
            old = srv.engine.pid
            os.kill(old, signal.SIGKILL)
            t_kill = time.monotonic()
            for c in clients:
                await c.wait_closed(5)
            noticed = time.monotonic() - t_kill
            code, body = await asyncio.to_thread(status, srv)
            seen = [(code, body["active"], body["free"])]
            while code != 200:
                assert time.monotonic() - t_kill < 30, f"/health still {code} 30 s after the kill"
                await asyncio.sleep(0.1)
                code, body = await asyncio.to_thread(status, srv)
                seen.append((code, body["active"], body["free"]))
            assert srv.engine.pid not in (None, old)
            fresh = await ChatClient.connect(http, srv.ws_url)
            n = await fresh.send_pcm(pcm[: 6 * FRAME])
            await fresh.wait_output_frames(n, timeout=30)
            served = time.monotonic() - t_kill
            assert not fresh.errors and fresh.output_frames == n
            await fresh.close()
            return clients, noticed, seen, served

    clients, noticed, seen, served = asyncio.run(go())
    for c in clients:
        assert c.errors == ["model worker restarted"], c.errors
    assert noticed < 1.0, f"the conversations were ended {noticed:.2f} s after the kill"
    assert seen[0][0] == 503 and seen[-1][0] == 200, seen
    assert all(active == 0 for _, active, _ in seen), seen  # the dead worker's slots were all freed
    assert seen[-1][2] == 3, seen  # ... and none leaked: every slot is free again
    assert served < 30, served
    assert restarts(srv) == 1.0
    print(f"\nkill -9: conversations ended after {1000 * noticed:.0f} ms, /health 503 → 200 "
          f"after {len(seen)} polls, a new conversation served {served:.1f} s after the kill")


def test_clean_stop_exits_the_worker_with_0(tmp_path):
    srv = BackgroundServer(["--demo", "--port", "0", "--cache-dir", str(tmp_path / "cache"),
                            "--max-conversations", "1", "--log-level", "warning"])
    proc = srv.engine._proc.process
    srv.stop()
    assert proc.exitcode == 0
    assert not srv.engine.alive

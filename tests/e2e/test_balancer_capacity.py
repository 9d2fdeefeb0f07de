"""Two demo instances with DIFFERENT slot counts (1 and 2) behind the shipped deploy/haproxy.cfg, whose
`maxconn` values (4) are left as shipped: HAProxy learns each instance's capacity from its agent port,
a full instance answers 503 before the upgrade and HAProxy retries the other one (no dead end), the
instances read the client address from X-Forwarded-For (HAProxy is a trusted proxy; a spoofed header
does not help), and the edge's stick table refuses a third concurrent conversation from one source.
Clients bind their source address (127.0.0.x)."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from moshi_ttt.server.web.client import ChatClient
from test_scaleout import HAPROXY, SHIPPED, _free_port, render_config, stats_status, wait_until

pytestmark = [pytest.mark.haproxy, pytest.mark.slow,
              pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")]

SLOTS = {"a": 1, "b": 2}


def start_instance(port: int, agent: int, slots: int, workdir: Path, extra: list[str]) -> subprocess.Popen:
    env = dict(os.environ, NO_TORCH_COMPILE="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("MOSHI_TTT_API_KEY", None)
    log = open(workdir / f"serve-{port}.log", "a")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moshi_ttt", "serve", "--demo", "--host", "127.0.0.1", "--port", str(port),
         "--cache-dir", str(workdir / "cache"), "--max-conversations", str(slots), "--idle-timeout", "60",
         "--log-level", "warning", "--threads", "1", "--trusted-proxies", "127.0.0.1", "--agent-port", str(agent),
         *extra], stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    proc.log_file = log
    return proc


def wait_listening(proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if "listening on" in line:
            return
    raise AssertionError(f"instance did not start: {Path(proc.log_file.name).read_text()[-3000:]}")


def session_limits(stats_port: int) -> dict[str, str]:
    """HAProxy's session limit (maxconn) per server of the `conversations` backend."""
    with urllib.request.urlopen(f"http://127.0.0.1:{stats_port}/;csv", timeout=2) as r:
        rows = csv.DictReader(io.StringIO(r.read().decode().lstrip("# ")))
        return {row["svname"]: row["slim"] for row in rows
                if row["pxname"] == "conversations" and row["svname"] in ("a", "b")}


def instance(port: int) -> tuple[int, dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
        health = json.loads(r.read())
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        fams = {}
        for line in r.read().decode().splitlines():
            if line.startswith("moshi_ttt_conversations_rejected_total{"):
                k, v = line.rsplit(" ", 1)
                fams[re.search(r'reason="(\w+)"', k).group(1)] = float(v)
    return health["active"], fams


@pytest.fixture
def balanced(tmp_path):
    ports = {k: _free_port() for k in ("front", "stats", "a", "b", "agent_a", "agent_b")}
    text = render_config(SHIPPED.read_text(), ports["front"], ports["stats"], ports["a"], ports["b"], 4)
    for name, shipped in (("a", 9998), ("b", 9999)):
        text, n = re.subn(rf"(maxconn \d+ )agent-port {shipped}\b", rf"\g<1>agent-port {ports['agent_' + name]}", text)
        assert n == 1, f"deploy/haproxy.cfg: no 'agent-port {shipped}' on server {name}"
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(text)
    check = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    procs = {}
    proxy = None
    log = open(tmp_path / "haproxy.log", "w")
    try:
        # b allows one conversation per client address: the limit must see the client behind HAProxy
        for name, extra in (("a", []), ("b", ["--max-conversations-per-ip", "1"])):
            procs[name] = start_instance(ports[name], ports["agent_" + name], SLOTS[name], tmp_path, extra)
        for p in procs.values():
            wait_listening(p)
        proxy = subprocess.Popen([HAPROXY, "-f", str(cfg), "-db"], stdout=log, stderr=subprocess.STDOUT)
        yield ports, procs
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(10)
        log.close()
        for p in procs.values():
            p.terminate()
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
            p.stdout.close()
            p.log_file.close()


def test_capacity_from_the_agent_retry_on_503_and_per_source_limits(balanced, server_speech):
    ports, procs = balanced
    front = f"ws://127.0.0.1:{ports['front']}/api/chat"
    speech = server_speech["b"][: 24000 // 2]

    def session(source: str) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source, 0), force_close=True))

    async def connect(source: str, url: str = front, headers: dict | None = None):
        """(ChatClient, its session) or (HTTP status, body). With `headers`: only the refusal is probed."""
        http = session(source)
        if headers is None:
            try:
                return await ChatClient.connect(http, url, handshake_timeout=20), http
            except aiohttp.WSServerHandshakeError:
                pass
        async with http.get(url.replace("ws://", "http://"), headers={
                "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", **(headers or {})}) as r:
            out = r.status, await r.text()
        await http.close()
        return out

    async def close(*convs) -> None:
        for c, http in convs:
            await c.close()
            await http.close()

    def actives() -> dict[str, int]:
        return {k: instance(ports[k])[0] for k in ("a", "b")}

    async def scenario() -> None:
        await wait_until(lambda: stats_status(ports["stats"]) == {"a": "UP", "b": "UP"}, 20, "both servers UP")
        # 1. the capacity comes from the instances, not from the config's maxconn 4
        await wait_until(lambda: session_limits(ports["stats"]) == {"a": "1", "b": "2"}, 10,
                         "HAProxy to learn maxconn 1 and 2 from the agents")
        convs = [await connect(f"127.0.0.{k}") for k in (2, 3, 4)]
        assert all(isinstance(c[0], ChatClient) for c in convs), convs
        assert actives() == {"a": 1, "b": 2}
        refused = await connect("127.0.0.5")  # 3 slots in all: the 4th waits `timeout queue`, then 503
        assert refused[0] == 503 and "no conversation slot free on any moshi-ttt instance" in refused[1], refused
        await close(*convs)
        await wait_until(lambda: actives() == {"a": 0, "b": 0}, 10, "the slots to be freed")

        # 2. not a dead end: a direct client takes a's only slot; HAProxy still counts a as free, sends it a
        # conversation, gets a's 503 before the upgrade and retries b
        direct = await connect("127.0.0.1", f"ws://127.0.0.1:{ports['a']}/api/chat")
        assert isinstance(direct[0], ChatClient)
        busy0 = instance(ports["a"])[1].get("busy", 0)
        via = [await connect(f"127.0.0.{k}") for k in (6, 7)]
        assert all(isinstance(c[0], ChatClient) for c in via), via
        assert actives() == {"a": 1, "b": 2}
        assert instance(ports["a"])[1].get("busy", 0) > busy0  # a refused at least one with its 503
        for c, _ in via:
            await c.send_pcm(speech)
            await c.wait_output_frames(3, timeout=30)
        await close(*via)
        await wait_until(lambda: actives() == {"a": 1, "b": 0}, 10, "b's slots to be freed")

        # 3. behind HAProxy, b limits the CLIENT's address (1 per address): a second conversation from the same
        # source is refused by b (a is full: its 503 sends the retry to b), spoofed X-Forwarded-For or not
        first = await connect("127.0.0.8")
        assert isinstance(first[0], ChatClient)
        per_ip0 = instance(ports["b"])[1].get("per_ip", 0)
        for headers in (None, {"X-Forwarded-For": "127.0.0.50"}):
            # HAProxy sees the previous probe's connection close a moment after the client closed it; until it
            # does, its own conn_cur limit (2 per source) may answer first, with its own 429 page: wait that out
            deadline = asyncio.get_running_loop().time() + 10
            while True:
                again = await connect("127.0.0.8", headers=headers)
                if "Too Many Requests" not in again[1] or asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert again[0] == 429 and "at most 1 per address" in again[1], again
        assert instance(ports["b"])[1].get("per_ip", 0) >= per_ip0 + 2
        other = await connect("127.0.0.9")  # another client address is served by b
        assert isinstance(other[0], ChatClient)
        await close(first, other, direct)
        await wait_until(lambda: actives() == {"a": 0, "b": 0}, 10, "all slots to be freed")

        # 4. the edge's stick table: a third concurrent conversation from one source is refused by HAProxy
        # itself (429), before any instance sees it
        two = [await connect("127.0.0.10") for _ in range(2)]
        assert all(isinstance(c[0], ChatClient) for c in two), two
        seen = {k: instance(ports[k])[1].get("per_ip", 0) for k in ("a", "b")}
        third = await connect("127.0.0.10")
        assert third[0] == 429 and "at most" not in third[1], third  # HAProxy's own 429 page
        assert {k: instance(ports[k])[1].get("per_ip", 0) for k in ("a", "b")} == seen
        await close(*two)

    try:
        asyncio.run(scenario())
    except BaseException:
        with contextlib.suppress(Exception):
            print((Path(procs["a"].log_file.name).parent / "haproxy.log").read_text()[-3000:])
        raise

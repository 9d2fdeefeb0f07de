"""Scale-out on loopback: two `moshi-ttt serve --demo --max-conversations 1` instances behind HAProxy run
with the shipped deploy/haproxy.cfg (only its ports and per-server maxconn substituted).

Checked: two conversations land on different instances; a third is refused with HAProxy's 503 after the
queue timeout; SIGTERM on an instance ends its conversation with a 0x05 and a new conversation is served
by the survivor within 3 s; the restarted instance takes traffic again; SIGKILL (a crash) closes its
conversation and the survivor serves the next one within 3 s. The figures are printed (`pytest -s`).
Conversation memory (both instances on one `--memory-store` folder): a conversation remembered on one
instance resumes through HAProxy on the other, with the fast weights the first one saved.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from moshi_ttt.server.web.client import FRAME, ChatClient

from support.launcher import ServeProcess
from support.memory_client import drifts, remember, resume, telemetry_drifts, wait_stored

SHIPPED = Path(__file__).resolve().parents[2] / "deploy" / "haproxy.cfg"
HAPROXY = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if os.access(p, os.X_OK)), None)
FAILOVER_LIMIT = 3.0

pytestmark = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (`make sysdeps` installs it: "
                                                        "apt-get install -y haproxy)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render_config(text: str, front: int, stats: int, a: int, b: int, slots: int) -> str:
    """The shipped config with its ports and per-server maxconn replaced; fails if its shape changed."""
    subs = [(r"bind 127\.0\.0\.1:8990\b", f"bind 127.0.0.1:{front}", 1),
            (r"bind 127\.0\.0\.1:8991\b", f"bind 127.0.0.1:{stats}", 1),
            (r"(server a 127\.0\.0\.1:)8998\b", rf"\g<1>{a}", 2), (r"(server b 127\.0\.0\.1:)8999\b", rf"\g<1>{b}", 2),
            (r"(server [ab] 127\.0\.0\.1:\d+ maxconn )4\b", rf"\g<1>{slots}", 2)]
    for pattern, repl, count in subs:
        text, n = re.subn(pattern, repl, text)
        assert n == count, f"deploy/haproxy.cfg: expected {count} match(es) of {pattern!r}, found {n}"
    return text


class Instance(ServeProcess):
    """One `moshi-ttt serve --demo` subprocess on a fixed port (one slot, one thread), restartable."""

    def __init__(self, port: int, workdir: Path, *extra: str):
        super().__init__(workdir, ["--max-conversations", "1", "--idle-timeout", "60", "--log-level", "warning",
                                   "--threads", "1", "--memory-store", str(workdir / "memories"), *extra],
                         host="127.0.0.1", port=port, omp_threads=1, log_path=workdir / f"serve-{port}.log")
        self.fixed_port = port

    def active(self) -> int | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.fixed_port}/health", timeout=2) as r:
                return json.loads(r.read())["active"]
        except OSError:
            return None


def stats_status(stats_port: int) -> dict[str, str]:
    """HAProxy's view of the `conversations` backend: server name → UP / DOWN / ..."""
    with urllib.request.urlopen(f"http://127.0.0.1:{stats_port}/;csv", timeout=2) as r:
        rows = csv.DictReader(io.StringIO(r.read().decode().lstrip("# ")))
        return {row["svname"]: row["status"].split()[0] for row in rows
                if row["pxname"] == "conversations" and row["svname"] in ("a", "b")}


async def wait_until(pred, timeout: float, what: str, step: float = 0.05) -> float:
    """Polls `pred` (sync) until true; returns the time it took."""
    t0 = time.monotonic()
    while True:
        with contextlib.suppress(OSError):
            if pred():
                return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(step)


@pytest.fixture
def cluster(tmp_path, request):
    ports = {k: _free_port() for k in ("front", "stats", "a", "b")}
    extra = getattr(request, "param", ())
    inst = {k: Instance(ports[k], tmp_path, *extra) for k in ("a", "b")}
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(render_config(SHIPPED.read_text(), ports["front"], ports["stats"], ports["a"], ports["b"], 1))
    check = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    haproxy_log = open(tmp_path / "haproxy.log", "w")
    proxy = None
    try:
        for i in inst.values():
            i.start()
        for i in inst.values():
            i.wait_listening()
        proxy = subprocess.Popen([HAPROXY, "-f", str(cfg), "-db"], stdout=haproxy_log, stderr=subprocess.STDOUT)
        yield inst, ports, proxy
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(10)
        haproxy_log.close()
        for i in inst.values():
            i.stop()


async def _served_by(inst: dict[str, Instance], busy: set[str]) -> str:
    """The instance that took the conversation just opened (the ones in `busy` were busy before)."""
    for _ in range(40):
        now = {k for k, i in inst.items() if i.active() == 1}
        new = now - busy
        if len(new) == 1:
            return new.pop()
        await asyncio.sleep(0.05)
    raise AssertionError(f"no instance took the conversation (active: {[i.active() for i in inst.values()]})")


@pytest.mark.haproxy
def test_two_instances_behind_haproxy(cluster, server_speech):
    inst, ports, proxy = cluster
    url = f"ws://127.0.0.1:{ports['front']}/api/chat"
    speech = server_speech["b"][: 24000 // 2]
    figures: dict[str, float] = {}

    async def open_conv(http) -> ChatClient:
        return await ChatClient.connect(http, url, handshake_timeout=20)

    async def scenario() -> None:
        await wait_until(lambda: stats_status(ports["stats"]) == {"a": "UP", "b": "UP"}, 15, "both servers UP")
        async with aiohttp.ClientSession() as http:
            # two conversations → one per instance (leastconn, maxconn 1 each)
            c1 = await open_conv(http)
            s1 = await _served_by(inst, set())
            c2 = await open_conv(http)
            s2 = await _served_by(inst, {s1})
            assert {s1, s2} == {"a", "b"}
            await c1.send_pcm(speech)
            await c1.wait_output_frames(3, timeout=20)

            # a third (from another source: the edge allows 2 per source): queued for `timeout queue`, then
            # HAProxy's 503 before the upgrade
            other = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0)))
            async with other:
                t0 = time.monotonic()
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await other.ws_connect(url)
                figures["refusal_s"] = time.monotonic() - t0
                assert refused.value.status == 503
                async with other.get(f"http://127.0.0.1:{ports['front']}/api/chat", headers={
                        "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}) as r:
                    assert r.status == 503
                    assert "no conversation slot free on any moshi-ttt instance" in await r.text()
            assert all(i.active() == 1 for i in inst.values())  # the refused one never reached an instance

            # SIGTERM (a stop) of c1's instance: c1 gets a 0x05 and a close; the next conversation goes to the
            # survivor
            victim, survivor = s1, s2
            await fail_over(http, victim, survivor, c1, c2, signal.SIGTERM, "sigterm")
            assert c1.errors == ["server shutting down"], c1.errors
            assert inst[victim].wait(20) == 0

            # restart it: HAProxy marks it UP again and it takes conversations
            t_restart = time.monotonic()
            inst[victim].start()
            inst[victim].wait_listening()
            figures["restart_listening_s"] = time.monotonic() - t_restart
            t_up = time.monotonic()
            await wait_until(lambda: stats_status(ports["stats"])[victim] == "UP", 10, "HAProxy to mark it UP")
            figures["marked_up_after_listening_s"] = time.monotonic() - t_up
            c4 = await open_conv(http)
            s4 = await _served_by(inst, set())
            c5 = await open_conv(http)
            s5 = await _served_by(inst, {s4})
            assert {s4, s5} == {"a", "b"}  # the restarted instance serves again

            # SIGKILL (a crash) of the same instance: no 0x05 can come from a dead process, but its conversation
            # is closed at once (HAProxy closes the client side), and the next one goes to the survivor
            on_victim, on_survivor = (c4, c5) if s4 == victim else (c5, c4)
            await fail_over(http, victim, survivor, on_victim, on_survivor, signal.SIGKILL, "sigkill")
            assert on_victim.errors == [] and on_victim.close_code != 1000, (on_victim.errors, on_victim.close_code)

    async def fail_over(http, victim: str, survivor: str, on_victim: ChatClient, on_survivor: ChatClient,
                        sig: int, key: str) -> None:
        """Ends the survivor's conversation, signals the victim, and times its conversation's end, the first
        conversation through HAProxy answered by the survivor, and HAProxy marking the victim DOWN."""
        await on_survivor.close()
        await wait_until(lambda: inst[survivor].active() == 0, 5, "the survivor's slot to be freed")
        t_kill = time.monotonic()
        inst[victim].signal(sig)
        await on_victim.wait_closed(FAILOVER_LIMIT)
        figures[f"{key}_conversation_end_s"] = time.monotonic() - t_kill
        conv = await open_conv(http)
        assert await _served_by(inst, set()) == survivor
        await conv.send_pcm(speech)
        await conv.wait_output_frames(3, timeout=20)
        figures[f"{key}_failover_s"] = time.monotonic() - t_kill
        assert figures[f"{key}_failover_s"] <= FAILOVER_LIMIT, figures
        await wait_until(lambda: stats_status(ports["stats"])[victim] == "DOWN", 10, "HAProxy to mark it DOWN")
        figures[f"{key}_marked_down_s"] = time.monotonic() - t_kill
        await conv.close()

    try:
        asyncio.run(scenario())
    except BaseException:
        with contextlib.suppress(Exception):
            print(Path(proxy.args[2]).with_name("haproxy.log").read_text()[-3000:])
        raise
    finally:
        print("scale-out figures:", {k: round(v, 2) for k, v in figures.items()})


@pytest.mark.haproxy
@pytest.mark.parametrize("cluster", [("--temp", "0", "--temp-text", "0", "--telemetry-interval", "0.3")],
                         indirect=True)
def test_resume_lands_on_the_other_instance(cluster, server_speech, tmp_path):
    """Remembered on one instance, disconnected, resumed through HAProxy while that instance is full: the
    other one restores exactly what the first saved (telemetry drift = the file's, read with the token)."""
    inst, ports, proxy = cluster
    url = f"ws://127.0.0.1:{ports['front']}/api/chat"

    async def scenario():
        await wait_until(lambda: stats_status(ports["stats"]) == {"a": "UP", "b": "UP"}, 15, "both servers UP")
        async with aiohttp.ClientSession() as http:
            c, n, _ = await remember(http, url, server_speech["b"][: 21 * FRAME], keep_open=True,
                                     handshake_timeout=20)
            saver = await _served_by(inst, set())
            await c.close()
            await wait_until(lambda: inst[saver].active() == 0, 10, "the saver's slot to be freed")
            saved = await wait_stored(tmp_path / "memories", c.memory()["token"], n)
            # one plain conversation on each instance, then the one on the other instance ends: only the
            # saver is full when the resume comes
            f1 = await ChatClient.connect(http, url, handshake_timeout=20)
            s1 = await _served_by(inst, set())
            f2 = await ChatClient.connect(http, url, handshake_timeout=20)
            s2 = await _served_by(inst, {s1})
            other = next(k for k in inst if k != saver)
            await (f1 if s1 == other else f2).close()
            await wait_until(lambda: inst[other].active() == 0, 10, "the other instance's slot to be freed")
            c2 = await resume(http, url, c.memory()["token"], handshake_timeout=20)
            landed = {k for k, i in inst.items() if i.active() == 1}
            await c2.close()
            await (f2 if s1 == other else f1).close()
            return n, saved, c2, landed, saver, other, {s1, s2}

    n, saved, c2, landed, saver, other, fillers = asyncio.run(scenario())
    assert fillers == {"a", "b"} and landed == {"a", "b"}  # the resume took the other instance's free slot
    assert saved.frames == n == 21 and saver != other
    r, first = c2.memory(), c2.ttt()[0]
    assert r["resumed"] is True and r["frames"] == n
    for layer, d in drifts(saved).items():
        assert telemetry_drifts(first)[layer] == pytest.approx(d, rel=1e-5), (layer, first, d)


def test_render_config_checks_the_shipped_shape():
    text = render_config(SHIPPED.read_text(), 1, 2, 3, 4, 7)
    assert "bind 127.0.0.1:1" in text and "server a 127.0.0.1:3 maxconn 7" in text
    assert "server b 127.0.0.1:4 maxconn 7" in text and "track conversations/b" in text
    with pytest.raises(AssertionError, match="expected 2 match"):
        render_config(SHIPPED.read_text().replace("maxconn 4", "maxconn 5"), 1, 2, 3, 4, 7)

"""Admission per client address (`server.guards.admission`): the address (X-Forwarded-For only from a trusted
proxy), open conversations per address, the start rate with its burst, the abuse ban; and on a served
demo, that a refused upgrade is an HTTP 429 that claims no slot (no reset, no model work), per source
address (client sockets bound to 127.0.0.x), with a spoofed X-Forwarded-For ignored."""

import asyncio
import json
import socket
import urllib.request

import aiohttp
import pytest
from moshi_ttt.server.guards.admission import Admission, AdmissionLimits, address_group, parse_networks
from moshi_ttt.server.serve import BackgroundServer
from moshi_ttt.server.web.client import FRAME, ChatClient

from support.probe import ws_handshake


def limits(**kw) -> AdmissionLimits:
    return AdmissionLimits(**{"max_per_ip": 2, "starts_per_minute": 60, "start_burst": 100, **kw})


def test_forwarded_for_is_read_only_from_trusted_proxies():
    a = Admission(limits(trusted_proxies=parse_networks(["127.0.0.1", "10.0.0.0/8"])))
    assert a.client_address("203.0.113.9", "1.2.3.4") == "203.0.113.9"  # untrusted peer: header ignored
    assert a.client_address("127.0.0.1", "1.2.3.4") == "1.2.3.4"
    assert a.client_address("127.0.0.1", "6.6.6.6, 1.2.3.4, 10.1.1.1") == "1.2.3.4"  # right-most untrusted hop
    assert a.client_address("127.0.0.1", "garbage, 1.2.3.4") == "1.2.3.4"
    assert a.client_address("127.0.0.1", "1.2.3.4, not-an-ip") == "127.0.0.1"  # malformed: trust nothing
    assert a.client_address("127.0.0.1", None) == "127.0.0.1"
    assert Admission(limits()).client_address("127.0.0.1", "1.2.3.4") == "127.0.0.1"  # no trusted list
    with pytest.raises(ValueError, match="'nope'"):
        parse_networks(["nope"])


def test_ipv6_addresses_are_budgeted_by_their_64():
    """One IPv6 subscriber has a /64: its addresses share one budget; another /64 has its own."""
    assert address_group("2001:db8:1:2::1") == address_group("2001:db8:1:2:ffff:1:2:3") == "2001:db8:1:2::/64"
    assert address_group("2001:db8:1:3::1") == "2001:db8:1:3::/64"
    assert address_group("::ffff:192.0.2.7") == address_group("192.0.2.7") == "192.0.2.7"
    assert address_group("fe80::1%eth0") == "fe80::/64" and address_group("?") == "?"
    a = Admission(limits(max_per_ip=2))
    assert a.refusal("2001:db8:1:2::1") is None and a.refusal("2001:db8:1:2::2") is None
    r = a.refusal("2001:db8:1:2:abcd::9")  # a third address of the same /64
    assert r is not None and r.label == "per_ip"
    assert a.refusal("2001:db8:1:3::1") is None  # the next /64 is another client
    assert a.open_count("2001:db8:1:2::77") == 2
    a.closed("2001:db8:1:2::2")
    assert a.refusal("2001:db8:1:2::3") is None


def test_memory_failure_budget_per_address(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("moshi_ttt.server.guards.admission.time.monotonic", lambda: clock[0])
    a = Admission(limits(memory_failures_per_minute=6, memory_failure_burst=3))
    for _ in range(3):  # a successful attempt costs nothing; each failure one token of the burst
        assert a.memory_refusal("1.1.1.1") is None
        a.memory_failed("1.1.1.1")
    r = a.memory_refusal("1.1.1.1")
    assert r is not None and r.status == 429 and r.label == "memory_failures" and r.retry_after == pytest.approx(10)
    assert "too many failed memory resumes or deletes (at most 6 a minute, burst 3)" in r.reason
    assert a.memory_refusal("2.2.2.2") is None  # another address has its own budget
    clock[0] += 10.0  # 6 a minute: one attempt back every 10 s
    assert a.memory_refusal("1.1.1.1") is None
    a.memory_failed("1.1.1.1")
    assert a.memory_refusal("1.1.1.1") is not None
    off = Admission(AdmissionLimits.off())
    for _ in range(100):
        off.memory_failed("1.1.1.1")
    assert off.memory_refusal("1.1.1.1") is None
    with pytest.raises(ValueError, match="memory_failure_burst must be >= 1, got 0"):
        AdmissionLimits(memory_failure_burst=0)


def test_open_conversations_per_address():
    a = Admission(limits())
    assert a.refusal("1.1.1.1") is None and a.refusal("1.1.1.1") is None
    r = a.refusal("1.1.1.1")
    assert r is not None and r.status == 429 and r.label == "per_ip" and "at most 2 per address" in r.reason
    assert a.refusal("2.2.2.2") is None  # another address is not affected
    a.closed("1.1.1.1")
    assert a.refusal("1.1.1.1") is None and a.open_count("1.1.1.1") == 2


def test_start_rate_with_burst():
    a = Admission(limits(max_per_ip=0, starts_per_minute=6, start_burst=3))
    for _ in range(3):
        assert a.refusal("1.1.1.1") is None
        a.closed("1.1.1.1")
    r = a.refusal("1.1.1.1")
    assert r is not None and r.label == "start_rate" and 0 < r.retry_after <= 10, r
    assert a.refusal("2.2.2.2") is None


def test_abuse_ban_after_k_cuts():
    a = Admission(limits(ban_after=2, ban_seconds=50))
    for _ in range(2):
        assert a.refusal("1.1.1.1") is None
        a.closed("1.1.1.1", abusive=True)
    r = a.refusal("1.1.1.1")
    assert r is not None and r.label == "banned" and 45 < r.retry_after <= 50, r
    assert a.banned("1.1.1.1") and not a.banned("2.2.2.2")  # aborted on accept, before any HTTP parsing
    assert a.refusal("2.2.2.2") is None
    proxied = Admission(limits(ban_after=1, trusted_proxies=parse_networks(["127.0.0.1"])))
    assert proxied.refusal("127.0.0.1") is None
    proxied.closed("127.0.0.1", abusive=True)
    assert not proxied.banned("127.0.0.1")  # a trusted proxy's connections are never aborted on accept
    b = Admission(limits(ban_after=2))
    for _ in range(5):  # conversations that ended normally never ban
        assert b.refusal("1.1.1.1") is None
        b.closed("1.1.1.1")
    assert b.refusal("1.1.1.1") is None


def test_bad_limits_are_named():
    with pytest.raises(ValueError, match="max_per_ip"):
        AdmissionLimits(max_per_ip=-1)
    with pytest.raises(ValueError, match="start_burst"):
        AdmissionLimits(start_burst=0)


# -- on a served demo -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("admission_server")
    srv = BackgroundServer(["--demo", "--port", "0", "--host", "127.0.0.1", "--cache-dir", str(d / "cache"),
                            "--max-conversations", "4", "--max-conversations-per-ip", "1",
                            "--max-starts-per-minute", "6", "--start-burst", "3", "--admit-lag", "1e9",
                            "--log-level", "warning"])
    yield srv
    srv.stop()


def upgrade_status(url: str, source: str, headers: str = "") -> tuple[int, socket.socket]:
    """A raw websocket upgrade from the source address `source`: (HTTP status, the open socket)."""
    s, status, _ = ws_handshake(url, headers, source=source)
    return int(status.split(" ", 2)[1]), s


def snapshot(url: str) -> tuple[dict, dict]:
    with urllib.request.urlopen(url + "/health", timeout=5) as r:
        health = json.loads(r.read())
    fams = {}
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("moshi_ttt_") and " " in line:
                k, v = line.rsplit(" ", 1)
                fams[k] = float(v)
    return health, fams


def test_per_address_limits_on_the_server(limited_server, server_speech):
    srv = limited_server
    url = srv.url
    code, first = upgrade_status(url, "127.0.0.5")
    assert code == 101
    h0, m0 = snapshot(url)
    assert h0["active"] == 1
    refused = []
    for spoof in ("", "X-Forwarded-For: 127.0.0.99\r\n"):  # a spoofed header from an untrusted peer: ignored
        code, s = upgrade_status(url, "127.0.0.5", spoof)
        refused.append(code)
        s.close()
    h1, m1 = snapshot(url)
    assert refused == [429, 429], refused
    # the refused upgrades claimed nothing: no conversation, no slot, no step or reset in the model worker
    assert h1["active"] == 1 and m1["moshi_ttt_conversations_total"] == m0["moshi_ttt_conversations_total"]
    assert m1['moshi_ttt_conversations_rejected_total{reason="per_ip"}'] == 2
    assert m1["moshi_ttt_steps_total"] == m0["moshi_ttt_steps_total"]
    code, other = upgrade_status(url, "127.0.0.6")  # another address still gets its conversation
    assert code == 101
    first.close()
    other.close()

    # the start rate: burst 3 per address (127.0.0.5 used 1 above), then 429 even with no conversation open
    async def starts() -> list[str]:
        out = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.5", 0))) as http:
            for _ in range(3):
                for _ in range(50):  # the closed conversations above are released asynchronously
                    if snapshot(url)[0]["active"] == 0:
                        break
                    await asyncio.sleep(0.1)
                try:
                    c = await ChatClient.connect(http, srv.ws_url)
                except aiohttp.WSServerHandshakeError as e:
                    out.append(str(e.status))
                    continue
                n = await c.send_pcm(server_speech["a"][: 2 * FRAME])
                await c.wait_output_frames(n, timeout=30)
                await c.close()
                out.append("ok")
        return out

    assert asyncio.run(starts()) == ["ok", "ok", "429"]

"""`moshi-ttt serve --demo` as a real subprocess (the CLI users run): /health, /metrics (Prometheus text,
counters moving), the placeholder page, and --api-key enforcement on HTTP and on the websocket."""

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import aiohttp
import pytest
import torch
from moshi_ttt.server.client import FRAME, ChatClient

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def cli_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_server")
    env = dict(os.environ, NO_TORCH_COMPILE="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("MOSHI_TTT_API_KEY", None)
    stderr = open(d / "stderr.txt", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moshi_ttt", "serve", "--demo", "--port", "0", "--cache-dir", str(d / "cache"),
         "--max-conversations", "1", "--api-key", KEY, "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    url = None
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            url = m.group(1)
            break
    if url is None:
        proc.kill()
        proc.wait()
        stderr.close()
        pytest.fail("server did not start:\n" + (d / "stderr.txt").read_text()[-3000:])
    yield url
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    finally:
        stderr.close()
        proc.stdout.close()
    assert code == 0, (d / "stderr.txt").read_text()[-3000:]


def test_health_metrics_and_api_key(cli_server, server_speech, parse_prometheus):
    url = cli_server
    ws_url = url.replace("http://", "ws://") + "/api/chat"

    async def go():
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/health") as r:  # liveness stays open
                assert r.status == 200
                h = await r.json()
                assert h["status"] == "ok" and h["active"] == 0 and h["max_conversations"] == 1 and h["demo"]
            async with http.get(url + "/") as r:
                assert r.status == 200 and "moshi-ttt" in await r.text()
            for bad in ({}, {"X-API-Key": "wrong"}):
                async with http.get(url + "/metrics", headers=bad) as r:
                    assert r.status == 401, bad
            async with http.get(url + "/metrics", headers={"X-API-Key": KEY}) as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
                before = parse_prometheus(await r.text())
            async with http.get(url + "/metrics", params={"api_key": KEY}) as r:
                assert r.status == 200
            # websocket: refused before the upgrade without the key ...
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                await http.ws_connect(ws_url)
            assert e.value.status == 401
            with pytest.raises(aiohttp.WSServerHandshakeError):
                await http.ws_connect(ws_url + "?api_key=wrong")
            # ... accepted with it (header, or query parameter as browsers must use).
            c = await ChatClient.connect(http, ws_url, api_key=KEY)
            n = await c.send_pcm(server_speech["b"][: 20 * FRAME])
            await c.wait_output_frames(n, timeout=30)
            # the single slot is taken: a second client is refused with 0x05 busy
            ws2 = await http.ws_connect(ws_url + "?api_key=" + KEY)
            msg = await ws2.receive(timeout=10)
            assert msg.data.startswith(b"\x05server busy")
            await ws2.close()
            await c.close()
            for _ in range(100):
                async with http.get(url + "/health") as r:
                    if (await r.json())["active"] == 0:
                        break
                await asyncio.sleep(0.05)
            # The slot is marked free at once; the worker accounts the conversation's final TTT counters
            # when it processes the release, a moment later.
            for _ in range(100):
                async with http.get(url + "/metrics", headers={"X-API-Key": KEY}) as r:
                    after = parse_prometheus(await r.text())
                if any(lb.get("layer") == "0" and v >= 1 for lb, v in after.get("moshi_ttt_ttt_updates_total", [])):
                    break
                await asyncio.sleep(0.05)
            return before, after, n

    before, after, n = asyncio.run(go())

    def val(fams, sample, **labels):
        vals = [v for lb, v in fams["moshi_ttt_" + sample] if lb == labels]
        assert len(vals) == 1, (sample, labels, fams["moshi_ttt_" + sample])
        return vals[0]

    listed = {"conversations_active": "gauge", "conversations": "counter", "conversations_rejected": "counter",
              "frame_latency_seconds": "histogram", "real_time_factor": "gauge", "ttt_updates": "counter",
              "ttt_clips": "counter", "ttt_skipped": "counter", "ttt_drift": "gauge", "step_seconds": "histogram"}
    for fam, kind in listed.items():
        assert after[("TYPE", "moshi_ttt_" + fam)] == kind, fam
    assert val(before, "conversations_total") == 0 and val(after, "conversations_total") == 1
    assert val(after, "conversations_active") == 0
    assert val(after, "conversations_rejected_total", reason="busy") == 1
    assert val(before, "http_unauthorized_total") == 2 and val(after, "http_unauthorized_total") == 4
    assert val(after, "frames_total") == n
    assert val(after, "frame_latency_seconds_count") == n
    assert 0 < val(after, "real_time_factor") < 1e4  # its value depends on the machine's load
    # tiny demo: TTT in layers 0 and 2, chunk 16 ⇒ 20 frames complete one chunk per layer
    assert val(after, "ttt_updates_total", layer="0") == 1 and val(after, "ttt_updates_total", layer="2") == 1


def test_0x04_only_with_telemetry_query(cli_server, server_speech, wait_http_free):
    """Without query parameters a client gets only what moshi's own server sends (0x00, 0x01, 0x02, 0x05):
    Kyutai's web client rejects 0x04. With ?telemetry=1 it also gets the info and TTT telemetry messages;
    any other value is refused before the upgrade."""
    from moshi_ttt.server import protocol

    url = cli_server
    ws_url = url.replace("http://", "ws://") + "/api/chat"

    async def converse(http, telemetry: bool) -> ChatClient:
        await wait_http_free(http, url)
        c = await ChatClient.connect(http, ws_url, api_key=KEY, telemetry=telemetry)
        n = await c.send_pcm(server_speech["b"][: 15 * FRAME])
        await c.wait_output_frames(n, timeout=30)
        if telemetry:
            await c.wait_for(lambda: c.ttt(), 10, "TTT telemetry")
        await c.close()
        return c

    async def go():
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                await http.ws_connect(ws_url, headers={"X-API-Key": KEY}, params={"telemetry": "yes"})
            assert e.value.status == 400
            return await converse(http, False), await converse(http, True)

    plain, asked = asyncio.run(go())
    assert set(plain.kinds) <= protocol.DEFAULT_SERVER_KINDS, plain.kinds
    assert plain.kinds[0] == protocol.Kind.HANDSHAKE and protocol.Kind.AUDIO in plain.kinds and not plain.metadata
    assert asked.kinds[:2] == [protocol.Kind.HANDSHAKE, protocol.Kind.METADATA], asked.kinds[:5]
    info = asked.metadata[0]
    assert info["type"] == "info" and info["ttt_layers"] == [0, 2], info
    assert asked.ttt() and set(asked.ttt()[0]["layers"]) == {"0", "2"}, asked.metadata


def test_plain_kyutai_checkpoint_serves_with_default_ttt_layers(tmp_path, caplog, health):
    """A checkpoint folder in Kyutai's layout with no TTT anywhere and no TTT flag: the server runs the shipped
    Moshi TTT defaults (layer 0 of the 4-layer tiny LM, chunk 256, zero init) and logs them in one line."""
    import logging

    from moshi_ttt.server.cli import BackgroundServer

    from moshi_ttt.models import demo as assets

    folder = assets.make_local_repo(tmp_path / "kyutai", ttt_in_weights=False, ttt_in_config=False)
    assert "ttt" not in (folder / "config.json").read_text()
    with caplog.at_level(logging.INFO, logger="moshi_ttt"):
        srv = BackgroundServer(["--hf-repo", str(folder), "--port", "0", "--max-conversations", "1"])
    try:
        h = health(srv)
    finally:
        srv.stop()
    assert h["ttt_layers"] == [0] and h["ttt"]["layer"]["chunk_size"] == 256 and h["ttt"]["layer"]["init"] == "zero"
    lines = [r.getMessage() for r in caplog.records if "TTT layers [" in r.getMessage() and " of " in r.getMessage()]
    assert len(lines) == 1 and "TTT layers [0] of 4" in lines[0] and "moshi7b_ttt" in lines[0], lines


def test_health_reports_ttt_state_bytes_and_state_dtype_flag(health):
    """/health reports the live per-conversation fast-state bytes; `--ttt-state-dtype bfloat16` makes the fast
    weight bf16 (in this fp32 CPU model applied through an fp32 copy, so the state grows by the bf16 tensor,
    2·d·h bytes per layer; in a bf16 model the bf16 weight is the applied one, see the 7B meta test)."""
    from moshi_ttt.server.cli import BackgroundServer

    got = {}
    for flag in ([], ["--ttt-state-dtype", "bfloat16"]):
        srv = BackgroundServer(["--demo", "--port", "0", "--max-conversations", "2", *flag])
        try:
            h = health(srv)
            gatings = srv.server.engine.lm_gen.lm_model.ttt_gatings().values()
            dh = sum(g.dim * g.hidden for g in gatings)
            assert {g._streaming_state.w.dtype for g in gatings} == {torch.bfloat16 if flag else torch.float32}
        finally:
            srv.stop()
        assert h["ttt"]["layer"]["state_dtype"] == (flag[1] if flag else "float32")
        got[bool(flag)] = h["ttt_state_bytes_per_conversation"]
    assert got[False] > 4 * dh
    assert got[True] == got[False] + 2 * dh

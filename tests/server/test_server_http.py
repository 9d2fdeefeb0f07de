"""`moshi-ttt serve --demo` as a real subprocess (the CLI users run): /health, /metrics (Prometheus text,
counters moving), the placeholder page, and --api-key enforcement on HTTP and on the websocket.

The scenario tests share one server (`cli_server`, one conversation slot) and leave its slot free; the
counters test has a server of its own (`fresh_server`), so its counts start from zero whatever ran before."""

import asyncio
import contextlib

import aiohttp
import pytest
import torch
from moshi_ttt.server.web.client import FRAME, ChatClient

from support.launcher import ServeProcess
from support.observe import health, parse_prometheus, wait_http_free

KEY = "s3cret-key"
FLAGS = ["--max-conversations", "1", "--api-key", KEY, "--log-level", "warning"]


def _serve(workdir):
    """`serve --demo` with FLAGS, stopped (SIGTERM) after the tests; a clean exit is asserted."""
    with ServeProcess(workdir, FLAGS) as srv:
        yield srv.url
    assert srv.returncode == 0, srv.log_tail()


@pytest.fixture(scope="module")
def cli_server(tmp_path_factory):
    yield from _serve(tmp_path_factory.mktemp("cli_server"))


@pytest.fixture
def fresh_server(tmp_path):
    yield from _serve(tmp_path)


def _ws(url: str) -> str:
    return url.replace("http://", "ws://") + "/api/chat"


async def _metrics(http, url: str) -> dict:
    async with http.get(url + "/metrics", headers={"X-API-Key": KEY}) as r:
        return parse_prometheus(await r.text())


async def _talk_while_a_second_client_comes(http, url: str, pcm) -> tuple[int, bytes]:
    """A conversation with the key (header) answers 20 frames; meanwhile a second client (key as query
    parameter) gets a first message; both close and the slot is free again. Returns (frames, that message)."""
    c = await ChatClient.connect(http, _ws(url), api_key=KEY)
    n = await c.send_pcm(pcm[: 20 * FRAME])
    await c.wait_output_frames(n, timeout=30)
    ws2 = await http.ws_connect(_ws(url) + "?api_key=" + KEY)
    msg = await ws2.receive(timeout=10)
    await ws2.close()
    await c.close()
    await wait_http_free(http, url)
    return n, msg.data


def test_health_is_open_without_the_key(cli_server):
    async def go():
        async with aiohttp.ClientSession() as http:
            async with http.get(cli_server + "/health") as r:  # liveness stays open
                return r.status, await r.json()

    status, h = asyncio.run(go())
    assert status == 200
    assert h["status"] == "ok" and h["active"] == 0 and h["max_conversations"] == 1 and h["demo"]
    assert "realtime_speed" in h and "real_time_factor" not in h


def test_placeholder_page(cli_server):
    async def go():
        async with aiohttp.ClientSession() as http:
            async with http.get(cli_server + "/") as r:
                return r.status, await r.text()

    status, text = asyncio.run(go())
    assert status == 200 and "moshi-ttt" in text


def test_metrics_need_the_key_as_header_or_query(cli_server):
    url = cli_server

    async def go():
        async with aiohttp.ClientSession() as http:
            for bad in ({}, {"X-API-Key": "wrong"}):
                async with http.get(url + "/metrics", headers=bad) as r:
                    assert r.status == 401, bad
            async with http.get(url + "/metrics", headers={"X-API-Key": KEY}) as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
                parse_prometheus(await r.text())
            async with http.get(url + "/metrics", params={"api_key": KEY}) as r:
                assert r.status == 200

    asyncio.run(go())


def test_websocket_is_refused_before_the_upgrade_without_the_key(cli_server):
    ws_url = _ws(cli_server)

    async def go():
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                await http.ws_connect(ws_url)
            assert e.value.status == 401
            with pytest.raises(aiohttp.WSServerHandshakeError):
                await http.ws_connect(ws_url + "?api_key=wrong")

    asyncio.run(go())


def test_key_is_accepted_and_a_second_client_gets_busy(cli_server, server_speech):
    """Accepted with the key (header, or query parameter as browsers must use); the single slot is taken:
    a second client is refused with 0x05 busy."""

    async def go():
        async with aiohttp.ClientSession() as http:
            return await _talk_while_a_second_client_comes(http, cli_server, server_speech["b"])

    _, second = asyncio.run(go())
    assert second.startswith(b"\x05server busy")


def test_metrics_count_conversations_refusals_frames_and_ttt_updates(fresh_server, server_speech):
    url = fresh_server

    async def go():
        async with aiohttp.ClientSession() as http:
            for bad in ({}, {"X-API-Key": "wrong"}):  # 2 unauthorized HTTP requests
                async with http.get(url + "/metrics", headers=bad):
                    pass
            before = await _metrics(http, url)
            for query in ("", "?api_key=wrong"):  # 2 unauthorized websocket upgrades
                with contextlib.suppress(aiohttp.WSServerHandshakeError):
                    await http.ws_connect(_ws(url) + query)
            n, _ = await _talk_while_a_second_client_comes(http, url, server_speech["b"])
            # The slot is marked free at once; the worker accounts the conversation's final TTT counters
            # when it processes the release, a moment later.
            for _ in range(100):
                after = await _metrics(http, url)
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
              "frame_latency_seconds": "histogram", "realtime_speed": "gauge", "ttt_updates": "counter",
              "ttt_clips": "counter", "ttt_skipped": "counter", "ttt_drift": "gauge", "step_seconds": "histogram"}
    for fam, kind in listed.items():
        assert after[("TYPE", "moshi_ttt_" + fam)] == kind, fam
    assert val(before, "conversations_total") == 0 and val(after, "conversations_total") == 1
    assert val(after, "conversations_active") == 0
    assert val(after, "conversations_rejected_total", reason="busy") == 1
    assert val(before, "http_unauthorized_total") == 2 and val(after, "http_unauthorized_total") == 4
    assert val(after, "frames_total") == n
    assert val(after, "frame_latency_seconds_count") == n
    assert 0 < val(after, "realtime_speed") < 1e4  # audio s / wall s: its value depends on the machine's load
    # tiny demo: TTT in layers 0 and 2, chunk 16 ⇒ 20 frames complete one chunk per layer
    assert val(after, "ttt_updates_total", layer="0") == 1 and val(after, "ttt_updates_total", layer="2") == 1


def test_0x04_only_with_telemetry_query(cli_server, server_speech):
    """Without query parameters a client gets only what moshi's own server sends (0x00, 0x01, 0x02, 0x05):
    Kyutai's web client rejects 0x04. With ?telemetry=1 it also gets the info and TTT telemetry messages;
    any other value is refused before the upgrade."""
    from moshi_ttt.server.web import protocol

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
            plain, asked = await converse(http, False), await converse(http, True)
            await wait_http_free(http, url)  # leave the shared server's slot free
            return plain, asked

    plain, asked = asyncio.run(go())
    assert set(plain.kinds) <= protocol.DEFAULT_SERVER_KINDS, plain.kinds
    assert plain.kinds[0] == protocol.Kind.HANDSHAKE and protocol.Kind.AUDIO in plain.kinds and not plain.metadata
    assert asked.kinds[:2] == [protocol.Kind.HANDSHAKE, protocol.Kind.METADATA], asked.kinds[:5]
    info = asked.metadata[0]
    assert info["type"] == "info" and info["ttt_layers"] == [0, 2], info
    assert asked.ttt() and set(asked.ttt()[0]["layers"]) == {"0", "2"}, asked.metadata


def test_plain_kyutai_checkpoint_serves_with_default_ttt_layers(tmp_path, caplog):
    """A checkpoint folder in Kyutai's layout with no TTT anywhere and no TTT flag: the server runs the shipped
    Moshi TTT defaults (layer 0 of the 4-layer tiny LM, chunk 256, zero init) and logs them in one line."""
    import logging

    from moshi_ttt.server.serve import BackgroundServer

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


def test_health_reports_ttt_state_bytes_and_state_dtype_flag():
    """/health reports the live per-conversation fast-state bytes; `--ttt-state-dtype bfloat16` makes the fast
    weight bf16 (in this fp32 CPU model applied through an fp32 copy, so the state grows by the bf16 tensor,
    2·d·h bytes per layer; in a bf16 model the bf16 weight is the applied one, see the 7B meta test)."""
    from moshi_ttt.server.serve import BackgroundServer

    got = {}
    for flag in ([], ["--ttt-state-dtype", "bfloat16"]):
        # one process (--workers 0): the test reads the model's live states itself
        srv = BackgroundServer(["--demo", "--port", "0", "--max-conversations", "2", "--workers", "0", *flag])
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

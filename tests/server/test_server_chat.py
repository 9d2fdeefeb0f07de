"""`moshi-ttt serve` conversations over a real websocket (loopback), with real speech encoded by sphn.

One in-process server (its own event loop and engine thread): the tiny demo TTT-Moshi with an `ntp`
TTT config (non-zero fast-weight drift), 2 conversation slots, greedy decoding (deterministic).
"""

import asyncio

import aiohttp
import pytest
from moshi_ttt.server.serve import BackgroundServer
from moshi_ttt.server.web import protocol
from moshi_ttt.server.web.client import FRAME, ChatClient, HandshakeError

from moshi_ttt.models import demo

from support import audio_match
from support.observe import health, wait_active

ECHO_DELAY = demo.ECHO_OUTPUT_FRAMES * FRAME
CHAT_ECHO_MIN = 0.45  # the reply's echo correlation (measured 0.65: docs/demo.md)
SAME_REPLY_MIN = 0.99  # greedy decoding, fresh slot: the same reply (measured 1.0000)


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory, demo_ttt_yaml):
    d = tmp_path_factory.mktemp("chat_server")
    srv = BackgroundServer(["--demo", "--port", "0", "--cache-dir", str(d / "cache"), "--max-conversations", "2",
                            "--temp", "0", "--temp-text", "0", "--ttt-config", str(demo_ttt_yaml(chunk_size=8)),
                            "--idle-timeout", "30", "--telemetry-interval", "0.5", "--no-per-ip-limits"])
    yield srv
    srv.stop()


async def run_conversation(http, srv, pcm, gate: asyncio.Event | None = None, keep_open: bool = False):
    """Connects, sends `pcm` (if `gate` is given: the first 40 frames, then the rest once it is set),
    waits for as many output frames and for the telemetry taken after the last frame.
    Returns (client, frames sent, final telemetry)."""
    c = await ChatClient.connect(http, srv.ws_url, telemetry=True)
    if gate is None:
        n = await c.send_pcm(pcm)
    else:
        n = await c.send_pcm(pcm[: 40 * FRAME])
        await c.wait_output_frames(n, timeout=60)
        await gate.wait()
        n += await c.send_pcm(pcm[40 * FRAME:])
    await c.wait_output_frames(n, timeout=60)
    await c.wait_for(lambda: any(m["frames"] == n for m in c.ttt()), 10, "telemetry after the last frame")
    final = [m for m in c.ttt() if m["frames"] == n][-1]
    if not keep_open:
        await c.close()
    return c, n, final


def drifts(tele: dict) -> dict:
    return {layer: v["drift"] for layer, v in tele["layers"].items()}


@pytest.fixture(scope="module")
def alone_a(chat_server, server_speech):
    """Conversation "a" run alone on the server: the reference for later comparisons."""
    async def go():
        async with aiohttp.ClientSession() as http:
            return await run_conversation(http, chat_server, server_speech["a"])
    return asyncio.run(go())


def test_handshake_then_audio_and_text_and_fresh_start(chat_server, server_speech, alone_a):
    c, n, final = alone_a
    assert c.kinds[0] == protocol.Kind.HANDSHAKE, c.kinds[:5]
    assert protocol.Kind.AUDIO in c.kinds[1:]
    # content: the reply is the input's echo (the demo's echo LM; its text stream is padding)
    echo = audio_match.echo_correlation(c.pcm, server_speech["a"], ECHO_DELAY, 2 * FRAME)
    print(f"chat server reply: echo {echo:.3f}")
    assert echo >= CHAT_ECHO_MIN, echo
    # reply duration within one frame of the input's (here exactly: one output frame per input frame)
    assert abs(c.n_samples - n * FRAME) <= FRAME, (c.n_samples, n * FRAME)
    start = c.ttt()[0]
    assert start["frames"] == 0
    assert all(v["drift"] == 0 and v["updates"] == 0 for v in start["layers"].values()), start
    assert set(final["layers"]) == {"0", "2"}
    assert all(v["drift"] > 0 and v["updates"] == n // 8 for v in final["layers"].values()), final
    info = next(m for m in c.metadata if m.get("type") == "info")
    assert info["ttt"]["layer"]["init"] == "ntp" and info["max_conversations"] == 2

    async def second():
        async with aiohttp.ClientSession() as http:
            return await run_conversation(http, chat_server, server_speech["a"])
    c2, n2, final2 = asyncio.run(second())
    # The second conversation starts from W⁽⁰⁾ and an empty KV cache ...
    s2 = c2.ttt()[0]
    assert s2["frames"] == 0 and all(v["drift"] == 0 and v["updates"] == 0 for v in s2["layers"].values()), s2
    # ... so the same audio gives the same fast weights and the same reply.
    for layer, d in drifts(final).items():
        assert drifts(final2)[layer] == pytest.approx(d, rel=1e-5)
    assert c2.n_samples == c.n_samples and "".join(c2.text) == "".join(c.text)
    same = audio_match.mel_correlation(c2.pcm, c.pcm)
    print(f"chat server: second reply vs first {same:.4f}")
    assert same > SAME_REPLY_MIN, same


def test_concurrent_conversations_busy_and_isolation(chat_server, server_speech, alone_a):
    _, n_alone, final_alone = alone_a

    async def go():
        async with aiohttp.ClientSession() as http:
            await wait_active(chat_server, 0)
            # "a" sends 40 frames, then waits for `gate` (set at the end) to send the rest: it outlives
            # everything below, and its audio is interleaved with the other conversations' audio.
            gate = asyncio.Event()
            task_a = asyncio.create_task(run_conversation(http, chat_server, server_speech["a"], gate=gate))
            cb = await ChatClient.connect(http, chat_server.ws_url, telemetry=True)
            await wait_active(chat_server, 2)
            # The 3rd client is refused with a 0x05 and a clean close (1013: try again later).
            with pytest.raises(HandshakeError):
                await ChatClient.connect(http, chat_server.ws_url, telemetry=True)
            rejected = await http.ws_connect(chat_server.ws_url)
            msg = await rejected.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.BINARY and msg.data.startswith(b"\x05server busy"), msg
            msg = await rejected.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.CLOSE and rejected.close_code == 1013, (msg, rejected.close_code)
            # "b" gets its replies while "a" streams.
            nb = await cb.send_pcm(server_speech["b"])
            await cb.wait_output_frames(nb, timeout=60)
            assert abs(cb.n_samples - nb * FRAME) <= FRAME and not cb.errors
            assert not task_a.done()
            await cb.close()
            # After "b" leaves, a new conversation is accepted (and served) while "a" still runs.
            await wait_active(chat_server, 1)
            cd = await ChatClient.connect(http, chat_server.ws_url, telemetry=True)
            nd = await cd.send_pcm(server_speech["b"][: 10 * FRAME])
            await cd.wait_output_frames(nd, timeout=30)
            assert cd.ttt()[0]["layers"]["0"]["drift"] == 0
            assert not task_a.done()
            # "d" keeps streaming (in a burst) while "a" sends the rest of its audio.
            send_d = asyncio.create_task(cd.send_pcm(server_speech["a"]))
            gate.set()
            result_a = await task_a
            nd += await send_d
            await cd.wait_output_frames(nd, timeout=60)
            assert not cd.errors
            await cd.close()
            await wait_active(chat_server, 0)  # a close is processed by the server asynchronously
            return result_a, nb

    (ca, na, final_a), nb = asyncio.run(go())
    assert na == n_alone and not ca.errors
    assert abs(ca.n_samples - na * FRAME) <= FRAME
    # Other conversations' traffic never leaks into a's state: same fast weights as when alone.
    for layer, d in drifts(final_alone).items():
        assert drifts(final_a)[layer] == pytest.approx(d, rel=1e-5), (layer, final_a, final_alone)
        assert final_a["layers"][layer]["updates"] == final_alone["layers"][layer]["updates"]
    h = health(chat_server)
    assert h["status"] == "ok" and h["active"] == 0 and h["free"] == 2

"""Conversation memory across server processes: two `moshi-ttt serve --demo` instances on one shared
`--memory-store` folder (the shared-directory deployment behind a balancer), a stop, a restart, an expiry.

1. a remembered conversation on A, still open, when A gets SIGTERM: it ends with "server shutting down" and
   A saves every frame it heard before it exits (shutdown waits for the saves);
2. A restarted: the conversation resumes there (the memory outlived the process);
3. that memory, saved again by A, resumes on B (one folder, two instances);
4. B restarted with a TTL shorter than the memory's age: the resume gets the one refusal, the log says why.
Each time the restored fast weights equal the file (read with the client's token) through the telemetry drift.
"""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import pytest
from moshi_ttt.server.web import protocol
from moshi_ttt.server.web.client import FRAME, ChatClient, HandshakeError

from support.launcher import ServeProcess
from support.memory_client import drifts, remember, resume, stored, telemetry_drifts, wait_stored

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]  # four server start-ups, ~40 s on 2 cores


def _args(store, yaml, *extra) -> list[str]:
    return ["--memory-store", str(store), "--ttt-config", str(yaml), "--temp", "0", "--temp-text", "0",
            "--max-conversations", "1", "--threads", "1", "--idle-timeout", "30", "--telemetry-interval", "0.3",
            "--no-per-ip-limits", "--log-level", "info", *extra]


def _assert_restored(client: ChatClient, memory, frames: int) -> None:
    r, first = client.memory(), client.ttt()[0]
    assert r["resumed"] is True and r["frames"] == frames == memory.frames, (r, memory.frames)
    for layer, d in drifts(memory).items():
        assert telemetry_drifts(first)[layer] == pytest.approx(d, rel=1e-5), (layer, first, d)


def test_stop_restart_shared_folder_expiry(tmp_path, demo_ttt_yaml, server_speech):
    store, yaml = tmp_path / "store", demo_ttt_yaml(chunk_size=8)
    a = ServeProcess(tmp_path / "a", _args(store, yaml), omp_threads=1)
    b = ServeProcess(tmp_path / "b", _args(store, yaml), omp_threads=1)
    pcm = server_speech["a"][: 29 * FRAME]  # 3 chunks of 8 and 5 frames

    async def go():
        async with aiohttp.ClientSession() as http:
            c, n, _ = await remember(http, a.ws_url, pcm, keep_open=True)
            a.signal(signal.SIGTERM)
            await c.wait_closed(30)
            assert c.errors == ["server shutting down"], c.errors
            assert a.wait(30) == 0, a.log_tail()
            saved = stored(store, c.memory()["token"])
            assert saved.frames == n == 29 and saved.chunks == 4  # every frame heard, the short chunk folded

            a.start()
            a.wait_listening()
            c2 = await resume(http, a.ws_url, c.memory()["token"])
            _assert_restored(c2, saved, n)
            n2 = await c2.send_pcm(server_speech["b"][: 8 * FRAME])
            await c2.wait_output_frames(n2, timeout=60)
            await c2.close()
            again = await wait_stored(store, c2.memory()["token"], n + n2)  # its final save

            c3 = await resume(http, b.ws_url, c2.memory()["token"])
            _assert_restored(c3, again, n + n2)
            await c3.close()
            token = c3.memory()["token"]
            await wait_stored(store, token, n + n2)  # re-sealed with the new token, saved again at its end

            b.stop()
            b.argv += ["--memory-ttl", "1e-9"]  # every stored memory is past its TTL now
            b.start()
            b.wait_listening()
            with pytest.raises(HandshakeError) as e:
                await ChatClient.connect(http, b.ws_url, resume=token)
            return str(e.value)

    try:
        a.start(), b.start()
        a.wait_listening(), b.wait_listening()
        err = asyncio.run(go())
    finally:
        a.stop(), b.stop()
    assert protocol.MEMORY_UNAVAILABLE in err
    assert "refused: expired" in b.log_text(), b.log_tail()

"""Conversation memory over the websocket (`?memory=1`, `?resume=TOKEN`, `DELETE /api/memory/{id}`).

One in-process server: the tiny demo TTT-Moshi (chunk 8, `ntp` TTT: the fast weights move), 2 slots, greedy,
an API key, a checkpoint every chunk, the per-address memory failure budget at 12 a minute (burst 12).
What the store holds is read back with the client's token (`support.memory_client.stored`).
"""

import asyncio
import logging
import time

import aiohttp
import pytest
from moshi_ttt.server.serve import BackgroundServer
from moshi_ttt.server.web import protocol
from moshi_ttt.server.web.app import CONFIG, SESSIONS
from moshi_ttt.server.web.client import FRAME, ChatClient, HandshakeError

from moshi_ttt.memory.seal import HEADER_CAP, MemoryUnavailable, Token

from support.memory_client import drifts, remember, resume, stored, telemetry_drifts
from support.observe import health, parse_prometheus, wait_active

KEY = "memory-test-key"
CHUNK = 8
BURST = 12


@pytest.fixture(scope="module")
def mem_server(tmp_path_factory, demo_ttt_yaml):
    d = tmp_path_factory.mktemp("memory_server")
    srv = BackgroundServer(["--demo", "--port", "0", "--cache-dir", str(d / "cache"), "--max-conversations", "2",
                            "--temp", "0", "--temp-text", "0", "--ttt-config", str(demo_ttt_yaml(chunk_size=CHUNK)),
                            "--idle-timeout", "30", "--telemetry-interval", "0.3", "--api-key", KEY,
                            "--memory-store", str(d / "store"), "--memory-save-every", "1",
                            "--max-conversations-per-ip", "0", "--max-starts-per-minute", "0",
                            "--memory-failures-per-minute", str(BURST), "--memory-failure-burst", str(BURST)])
    srv.store = d / "store"
    yield srv
    srv.stop()


def run(coro):
    return asyncio.run(coro)


async def ended(srv) -> None:
    """Until the server's sessions are over (their final saves done)."""
    await wait_active(srv, 0, timeout=10)
    for _ in range(200):
        if not srv.server.runner.app[SESSIONS]:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("sessions still running")


async def metrics(http, srv) -> dict:
    async with http.get(f"{srv.url}/metrics", headers={"X-API-Key": KEY}) as r:
        return parse_prometheus(await r.text())


def test_remember_disconnect_resume(mem_server, server_speech):
    pcm = server_speech["a"][: 45 * FRAME]  # 45 frames: 5 chunks of 8 and a short last chunk of 5

    async def go():
        async with aiohttp.ClientSession() as http:
            c, n, final = await remember(http, mem_server.ws_url, pcm, api_key=KEY)
            await ended(mem_server)
            c2 = await resume(http, mem_server.ws_url, c.memory()["token"], api_key=KEY)
            first = c2.ttt()[0]
            mid = stored(mem_server.store, c2.memory()["token"])
            n2 = await c2.send_pcm(server_speech["b"][: 16 * FRAME])
            await c2.wait_output_frames(n2, timeout=60)
            await c2.close()
            await ended(mem_server)
            return c, n, final, c2, first, mid, n2, await metrics(http, mem_server)

    c, n, final, c2, first, mid, n2, fams = run(go())
    m = c.memory()
    # the memory message is the first message after the handshake; the token names the id; 30 days
    assert c.kinds[:2] == [protocol.Kind.HANDSHAKE, protocol.Kind.METADATA] and c.metadata[0] == {"memory": m}
    assert m["token"].startswith(m["id"] + ".") and len(m["id"]) == 32
    assert m["expires"] == pytest.approx(time.time() + 30 * 86400, abs=120)
    # the saved memory covers every frame heard: the short last chunk is folded (6 updates, not 5)
    r = c2.memory()
    assert r["resumed"] is True and r["frames"] == n == 45 and r["id"] == m["id"] and r["token"] != m["token"]
    assert mid.frames == 45 and mid.chunks == 6 and all(lm.counters["updates"] == 6 for lm in mid.layers.values())
    # the resumed conversation starts at the saved fast weights: its first telemetry is the saved drift
    assert first["frames"] == 0 and all(v["updates"] == 6 for v in first["layers"].values()), first
    for layer, d in drifts(mid).items():
        assert telemetry_drifts(first)[layer] == pytest.approx(d, rel=1e-5), (layer, first, d)
        assert telemetry_drifts(final)[layer] != pytest.approx(d, rel=1e-5)  # the 5 frames of the short chunk
    # the old token stops working (the memory was re-sealed with the new key at once)
    with pytest.raises(MemoryUnavailable):
        stored(mem_server.store, m["token"])
    # the resumed conversation is saved under the same id: frames add up
    end = stored(mem_server.store, r["token"])
    assert end.frames == 45 + n2 and end.chunks == 6 + 2
    assert end.created == pytest.approx(mid.created)
    # the metrics: saves by trigger, restores, bytes, save and restore seconds
    saves = {lb["trigger"]: v for lb, v in fams["moshi_ttt_memory_saves_total"]}
    assert saves.get("end", 0) >= 2 and saves.get("checkpoint", 0) >= 5 and saves.get("resume", 0) >= 1, saves
    assert fams["moshi_ttt_memory_restores_total"][0][1] >= 1
    assert fams["moshi_ttt_memory_save_seconds_count"][0][1] >= 7
    assert fams["moshi_ttt_memory_restore_seconds_count"][0][1] >= 1
    by_dir = {lb["direction"]: v for lb, v in fams["moshi_ttt_memory_bytes_total"]}
    assert by_dir["saved"] > 0 and by_dir["restored"] > 0 and by_dir["read"] == by_dir["restored"]


def test_checkpoint_while_the_conversation_runs(mem_server, server_speech):
    async def go():
        async with aiohttp.ClientSession() as http:
            c, n, _ = await remember(http, mem_server.ws_url, server_speech["b"][: 20 * FRAME], keep_open=True,
                                     api_key=KEY)
            await asyncio.sleep(0.3)
            during = stored(mem_server.store, c.memory()["token"])  # the conversation is still open
            await c.close()
            await ended(mem_server)
            return n, during, stored(mem_server.store, c.memory()["token"])

    n, during, after = run(go())
    # --memory-save-every 1: checkpoints after chunks 1 and 2 (frames 8, 16; taken a few frames later at most)
    assert 8 <= during.frames <= n and after.frames == n == 20


def test_a_close_right_after_sending_loses_no_frame(mem_server, server_speech):
    """The client closes without waiting for its replies: the final save waits for its queued frames."""
    async def go():
        async with aiohttp.ClientSession() as http:
            c = await ChatClient.connect(http, mem_server.ws_url, api_key=KEY, memory=True)
            await c.wait_for(lambda: c.memory() is not None, 10, "the memory message")
            n = await c.send_pcm(server_speech["a"][: 30 * FRAME])
            await c.close()
            await ended(mem_server)
            return n, stored(mem_server.store, c.memory()["token"])

    n, saved = run(go())
    assert saved.frames == n == 30 and saved.chunks == 4


def test_an_error_ending_saves_too(mem_server, server_speech):
    """A conversation cut by the server (here a protocol error of the client) is saved like a clean close."""
    async def go():
        async with aiohttp.ClientSession() as http:
            c, n, _ = await remember(http, mem_server.ws_url, server_speech["b"][: 11 * FRAME], keep_open=True,
                                     api_key=KEY)
            await c.send_raw(b"\x07")  # no such kind
            await c.wait_closed(10)
            await ended(mem_server)
            return c, n, stored(mem_server.store, c.memory()["token"])

    c, n, saved = run(go())
    assert c.errors == ["protocol error: unknown message kind 0x07"] and c.close_code == 1003, c.errors
    assert saved.frames == n == 11


def test_memory_flags():
    import argparse

    from moshi_ttt.server.serve import add_args, serve_config

    p = argparse.ArgumentParser()
    add_args(p)
    args = serve_config(p.parse_args(["--demo", "--cache-dir", "/tmp/c"]))  # the flags as the server reads them
    assert args.memory_store == "/tmp/c/memories" and args.memory_save_every == 4 and args.memory_ttl == 30
    assert p.parse_args([]).memory_store is None  # a checkpoint: memory only with --memory-store
    for flags, msg in ((["--memory-format", "rank:0"], "invalid memory format 'rank:0'"),
                       (["--memory-save-every", "-1"], "--memory-save-every must be >= 0 chunks, got -1"),
                       (["--memory-ttl", "0"], "--memory-ttl must be > 0 days, got 0.0")):
        with pytest.raises(ValueError, match=msg):
            serve_config(p.parse_args(["--memory-store", "/tmp/s", *flags]))


def test_bad_tokens_get_one_refusal(mem_server, server_speech, caplog):
    caplog.set_level(logging.WARNING, logger="moshi_ttt.server.memory")

    async def go():
        async with aiohttp.ClientSession() as http:
            ca, _, _ = await remember(http, mem_server.ws_url, server_speech["b"][: 10 * FRAME], api_key=KEY)
            cb, _, _ = await remember(http, mem_server.ws_url, server_speech["b"][: 10 * FRAME], api_key=KEY)
            await ended(mem_server)
            a, b = Token.parse(ca.memory()["token"]), Token.parse(cb.memory()["token"])
            path = mem_server.store / f"{b.id}.mem"
            blob = bytearray(path.read_bytes())
            blob[-40] ^= 1  # one bit of the ciphertext
            path.write_bytes(bytes(blob))
            wrong_key = str(Token(a.id, Token.new().key))
            out = {}
            for name, tok in (("unknown", str(Token.new())), ("wrong key", wrong_key), ("tampered", str(b)),
                              ("malformed", "not-a-token")):
                ws = await http.ws_connect(mem_server.ws_url, params={"resume": tok, "api_key": KEY})
                msgs = []
                async for msg in ws:
                    msgs.append(msg)
                out[name] = ([protocol.decode_server_message(x.data) for x in msgs], ws.close_code)
            return out

    out = run(go())
    expected = ([(protocol.Kind.ERROR, protocol.MEMORY_UNAVAILABLE)], 1008)
    assert all(v == expected for v in out.values()), out  # byte for byte the same answer
    logged = " | ".join(r.getMessage() for r in caplog.records if "refused" in r.getMessage())
    for cause in ("unknown id", "wrong key", "tampered", "malformed token"):  # the real cause is in the log
        assert cause in logged, logged


def test_delete_then_404_then_resume_refused(mem_server, server_speech):
    async def go():
        async with aiohttp.ClientSession() as http:
            c, _, _ = await remember(http, mem_server.ws_url, server_speech["b"][: 10 * FRAME], api_key=KEY)
            await ended(mem_server)
            m = c.memory()
            url = f"{mem_server.url}/api/memory/{m['id']}"
            bearer = {"Authorization": f"Bearer {m['token']}"}
            codes = {}
            async with http.delete(url, headers=bearer) as r:  # the API key guards this endpoint too
                codes["no api key"] = r.status
            async with http.delete(url, headers={**bearer, "X-API-Key": KEY, "Authorization": "Bearer x.y"}) as r:
                codes["bad token"] = r.status
            other = str(Token.new())
            async with http.delete(url, headers={"X-API-Key": KEY, "Authorization": f"Bearer {other}"}) as r:
                codes["another id's token"] = r.status
            present = (mem_server.store / f"{m['id']}.mem").exists()
            async with http.delete(url, headers={**bearer, "X-API-Key": KEY}) as r:
                codes["delete"] = r.status
            gone = not (mem_server.store / f"{m['id']}.mem").exists()
            async with http.delete(url, headers={**bearer, "X-API-Key": KEY}) as r:
                codes["again"] = r.status
            with pytest.raises(HandshakeError) as e:
                await ChatClient.connect(http, mem_server.ws_url, api_key=KEY, resume=m["token"])
            return codes, present, gone, str(e.value)

    codes, present, gone, err = run(go())
    assert codes == {"no api key": 401, "bad token": 404, "another id's token": 404, "delete": 204, "again": 404}
    assert present and gone and protocol.MEMORY_UNAVAILABLE in err


def test_failed_attempt_budget_blocks_the_address(mem_server):
    """From 127.0.0.2 (its own budget): BURST failed resumes / deletes are answered, the next ones get 429."""
    async def go():
        conn = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with aiohttp.ClientSession(connector=conn) as http:
            url = mem_server.ws_url.replace("localhost", "127.0.0.1")
            base = mem_server.url.replace("localhost", "127.0.0.1")
            answered = 0
            for i in range(BURST):
                tok = Token.new()
                if i % 2:
                    async with http.delete(f"{base}/api/memory/{tok.id}",
                                           headers={"X-API-Key": KEY, "Authorization": f"Bearer {tok}"}) as r:
                        answered += r.status == 404
                else:
                    with pytest.raises(HandshakeError):
                        await ChatClient.connect(http, url, api_key=KEY, resume=str(tok))
                    answered += 1
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                await http.ws_connect(url, params={"resume": str(Token.new()), "api_key": KEY})
            async with http.delete(f"{base}/api/memory/{'0' * 32}", headers={"X-API-Key": KEY}) as r:
                delete_status, retry = r.status, r.headers.get("Retry-After")
            return answered, e.value.status, delete_status, retry, await metrics(http, mem_server)

    answered, ws_status, delete_status, retry, fams = run(go())
    assert answered == BURST and ws_status == 429 and delete_status == 429 and int(retry) >= 1
    causes = {lb["cause"]: v for lb, v in fams["moshi_ttt_memory_failures_total"]}
    assert causes.get("unknown_id", 0) >= BURST  # every refusal counted with its real cause


def test_plain_clients_see_moshis_protocol(mem_server, server_speech):
    """A client that asks for nothing gets moshi's kinds only (no 0x04), and nothing is stored for it."""
    async def go():
        async with aiohttp.ClientSession() as http:
            before = set(mem_server.store.glob("*.mem"))
            c = await ChatClient.connect(http, mem_server.ws_url, api_key=KEY)
            n = await c.send_pcm(server_speech["b"][: 10 * FRAME])
            await c.wait_output_frames(n, timeout=60)
            await c.close()
            await ended(mem_server)
            return c, set(mem_server.store.glob("*.mem")) - before

    c, new = run(go())
    assert set(c.kinds) <= {protocol.Kind.HANDSHAKE, protocol.Kind.AUDIO, protocol.Kind.TEXT}, set(c.kinds)
    assert not new
    assert health(mem_server)["memory"] == {"format": "exact", "save_every_chunks": 1, "ttl_days": 30.0}


def test_idle_timeout_saves_with_the_in_process_engine(tmp_path, demo_ttt_yaml, server_speech):
    """`--workers 0` (the engine in the web process) and an ending by idle timeout: every frame is saved."""
    srv = BackgroundServer(["--demo", "--port", "0", "--cache-dir", str(tmp_path / "cache"), "--workers", "0",
                            "--max-conversations", "1", "--temp", "0", "--temp-text", "0", "--no-per-ip-limits",
                            "--ttt-config", str(demo_ttt_yaml(chunk_size=CHUNK)), "--idle-timeout", "1",
                            "--telemetry-interval", "0.3", "--memory-save-every", "0"])

    async def go():
        async with aiohttp.ClientSession() as http:
            c, n, _ = await remember(http, srv.ws_url, server_speech["b"][: 13 * FRAME], keep_open=True)
            await c.wait_closed(10)
            await ended(srv)
            saved = stored(tmp_path / "cache" / "memories", c.memory()["token"])  # --demo's default store
            c2 = await resume(http, srv.ws_url, c.memory()["token"])
            await c2.close()
            return c, n, saved, c2

    try:
        c, n, saved, c2 = run(go())
    finally:
        srv.stop()
    assert c.errors and c.errors[0].startswith("idle timeout"), c.errors
    assert saved.frames == n == 13 and saved.chunks == 2  # --memory-save-every 0: the one save at the end
    assert c2.memory()["frames"] == 13
    for layer, d in drifts(saved).items():
        assert telemetry_drifts(c2.ttt()[0])[layer] == pytest.approx(d, rel=1e-5)


async def answer_to(c: ChatClient, obj) -> dict:
    """Sends a client 0x04 `obj` and returns the server's next memory answer ({"confirmed"...} or {"error"...})."""
    seen = len(c.metadata)
    await c.send_raw(protocol.metadata(obj))

    def answer():
        return next((m["memory"] for m in c.metadata[seen:] if isinstance(m.get("memory"), dict)
                     and ("confirmed" in m["memory"] or "error" in m["memory"])), None)
    await c.wait_for(lambda: answer() is not None, 10, "the memory answer")
    return answer()


def test_a_drop_before_the_confirmation_keeps_the_old_token(mem_server, server_speech):
    """Resumed, talked, dropped without confirming the new token: every save was sealed with the old token,
    which still opens the memory (with the frames of both conversations); the new one opens nothing."""
    async def go():
        async with aiohttp.ClientSession() as http:
            c, n, _ = await remember(http, mem_server.ws_url, server_speech["b"][: 10 * FRAME], api_key=KEY)
            await ended(mem_server)
            c2 = await resume(http, mem_server.ws_url, c.memory()["token"], confirm=False, api_key=KEY)
            n2 = await c2.send_pcm(server_speech["a"][: 9 * FRAME])
            await c2.wait_output_frames(n2, timeout=60)
            await c2.close()
            await ended(mem_server)
            return c, n, c2, n2

    c, n, c2, n2 = run(go())
    assert stored(mem_server.store, c.memory()["token"]).frames == n + n2
    with pytest.raises(MemoryUnavailable):
        stored(mem_server.store, c2.memory()["token"])


def test_confirmations_bad_or_good_never_end_the_conversation(mem_server, server_speech):
    async def go():
        async with aiohttp.ClientSession() as http:
            fresh, _, _ = await remember(http, mem_server.ws_url, server_speech["b"][: 8 * FRAME], keep_open=True,
                                         api_key=KEY)
            answers = {"unexpected": await fresh.confirm_memory()}
            await fresh.close()
            await ended(mem_server)
            c = await resume(http, mem_server.ws_url, fresh.memory()["token"], confirm=False, api_key=KEY)
            tok = c.memory()["token"]
            answers["not a string"] = await answer_to(c, {"memory": {"confirm": 5}})
            answers["not an object"] = await answer_to(c, {"memory": "yes"})
            answers["extra key"] = await answer_to(c, {"memory": {"confirm": tok, "more": 1}})
            answers["another token"] = await c.confirm_memory(str(Token.new(c.memory()["id"])))
            answers["ok"] = await c.confirm_memory()
            answers["duplicate"] = await c.confirm_memory()
            n = await c.send_pcm(server_speech["a"][: 8 * FRAME])  # the conversation went on throughout
            await c.wait_output_frames(n, timeout=60)
            await c.send_raw(bytes([protocol.Kind.METADATA]) + b"{not json")
            await c.wait_closed(10)
            await ended(mem_server)
            return answers, c, n

    answers, c, n = run(go())
    errors = {k: v.get("error", "") for k, v in answers.items() if k != "ok"}
    assert errors["unexpected"].startswith("nothing to confirm"), errors
    for k in ("not a string", "not an object", "extra key"):
        assert errors[k].startswith("malformed confirmation"), errors
    assert errors["another token"] == "not the token this conversation was sent", errors
    assert errors["duplicate"] == "this token was already confirmed", errors
    assert answers["ok"]["confirmed"] is True and answers["ok"]["id"] == c.memory()["id"], answers["ok"]
    assert c.errors and c.errors[0].startswith("protocol error: 0x04 metadata must be a UTF-8 JSON object"), c.errors
    assert c.close_code == 1007
    assert stored(mem_server.store, c.memory()["token"]).frames == 8 + n  # saved under the confirmed token


def test_concurrent_resumes_of_one_token_exactly_one_resumes(mem_server, server_speech):
    async def go():
        async with aiohttp.ClientSession() as http:
            c, _, _ = await remember(http, mem_server.ws_url, server_speech["b"][: 8 * FRAME], api_key=KEY)
            await ended(mem_server)
            tries = await asyncio.gather(*(ChatClient.connect(http, mem_server.ws_url, api_key=KEY,
                                                              resume=c.memory()["token"]) for _ in range(3)),
                                         return_exceptions=True)
            for t in tries:
                if isinstance(t, ChatClient):
                    await t.close()
            await ended(mem_server)
            return tries

    tries = run(go())
    won = [t for t in tries if isinstance(t, ChatClient)]
    lost = [t for t in tries if isinstance(t, HandshakeError)]
    assert len(won) == 1 and len(lost) == 2, tries
    assert all(protocol.MEMORY_UNAVAILABLE in str(e) for e in lost), lost


def test_a_resume_refused_as_busy_reads_no_body_and_leaves_the_memory_free(mem_server, server_speech):
    """Both slots taken: a resume with a good token is refused "server busy" after its header alone was read (no
    body read: the read bytes metric does not move), and its id is not left in use: it resumes once a slot is
    free."""
    async def go():
        async with aiohttp.ClientSession() as http:
            c, _, _ = await remember(http, mem_server.ws_url, server_speech["b"][: 8 * FRAME], api_key=KEY)
            await ended(mem_server)
            token = c.memory()["token"]
            store = mem_server.server.runner.app[CONFIG].memories.store
            fillers = [await ChatClient.connect(http, mem_server.ws_url, api_key=KEY) for _ in range(2)]
            read0, bytes0 = (await metrics(http, mem_server)), store.bytes_read
            with pytest.raises(HandshakeError) as busy:
                await ChatClient.connect(http, mem_server.ws_url, api_key=KEY, resume=token)
            read1, bytes1 = (await metrics(http, mem_server)), store.bytes_read
            for f in fillers:
                await f.close()
            await ended(mem_server)
            c2 = await resume(http, mem_server.ws_url, token, api_key=KEY)
            await c2.close()
            await ended(mem_server)
            return str(busy.value), read0, read1, bytes1 - bytes0, c2

    busy, read0, read1, header_bytes, c2 = run(go())

    def body_bytes(fams) -> float:
        return {lb["direction"]: v for lb, v in fams["moshi_ttt_memory_bytes_total"]}.get("read", 0.0)

    assert "server busy" in busy, busy
    assert body_bytes(read1) == body_bytes(read0) and 0 < header_bytes <= HEADER_CAP, (header_bytes, busy)
    assert c2.memory()["resumed"] is True


def _from(source: str) -> aiohttp.ClientSession:
    """A client session whose connections come from the local address `source` (its own budgets and quota)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source, 0)))


async def _remembered(server, http, url: str, n: int, during) -> None:
    """`n` `?memory=1` conversations one after the other: each runs `during(client)`, closes, and is over on the
    server (its final save done, its slot free) before the next."""
    for _ in range(n):
        c = await ChatClient.connect(http, url, api_key=KEY, memory=True)
        await during(c)
        await c.close()
        await ended(server)


def test_empty_memory_conversations_store_nothing(mem_server):
    """20 `?memory=1` conversations that hear nothing (the memory message, then a close) store nothing."""
    async def go():
        before = set(mem_server.store.glob("*.mem"))
        async with _from("127.0.0.8") as http:
            url = mem_server.ws_url.replace("localhost", "127.0.0.1")
            await _remembered(mem_server, http, url, 20,
                              lambda c: c.wait_for(lambda: c.memory() is not None, 10, "the memory message"))
        return set(mem_server.store.glob("*.mem")) - before

    assert run(go()) == set()


def test_a_memory_over_the_quota_is_refused(mem_server, server_speech):
    """One address stores its quota of memories (20 by default); its 21st is refused at its first checkpoint with
    the quota's 0x05, and nothing is stored for it."""
    async def go():
        before = set(mem_server.store.glob("*.mem"))
        async with _from("127.0.0.9") as http:
            url = mem_server.ws_url.replace("localhost", "127.0.0.1")
            async def one_frame(c):
                await c.wait_output_frames(await c.send_pcm(server_speech["b"][:FRAME]), timeout=30)
            await _remembered(mem_server, http, url, 20, one_frame)
            stored_20 = len(set(mem_server.store.glob("*.mem")) - before)
            c = await ChatClient.connect(http, url, api_key=KEY, memory=True)
            await c.send_pcm(server_speech["b"][: 2 * CHUNK * FRAME])  # a checkpoint after the first chunk
            await c.wait_closed(30)
            await ended(mem_server)
            return stored_20, len(set(mem_server.store.glob("*.mem")) - before), c, await metrics(http, mem_server)

    stored_20, stored_all, c, fams = run(go())
    assert stored_20 == 20 and stored_all == 20, (stored_20, stored_all)
    assert c.errors and c.errors[0].startswith("memory refused: this client's quota"), c.errors
    assert c.close_code == 1008
    causes = {lb["cause"]: v for lb, v in fams["moshi_ttt_memory_failures_total"]}
    ends = {lb["reason"]: v for lb, v in fams["moshi_ttt_conversation_errors_total"]}
    assert causes.get("quota", 0) >= 1 and ends.get("memory_quota") == 1, (causes, ends)


def test_a_full_store_refuses_new_memories_and_evicts_nobody(tmp_path, demo_ttt_yaml, server_speech):
    """A store bounded to 1.5 memories: the first is stored, the second (another address, within its quota) is
    refused with the full store's 0x05, and the first still opens."""
    def server(*extra: str) -> BackgroundServer:
        return BackgroundServer(["--demo", "--port", "0", "--cache-dir", str(tmp_path / "cache"), "--temp", "0",
                                 "--temp-text", "0", "--ttt-config", str(demo_ttt_yaml(chunk_size=CHUNK)),
                                 "--no-per-ip-limits", "--memory-save-every", "1", *extra])

    async def one(srv, source: str, keep_open: bool):
        async with _from(source) as http:
            url = srv.ws_url.replace("localhost", "127.0.0.1")
            c = await ChatClient.connect(http, url, memory=True)
            await c.send_pcm(server_speech["b"][: 2 * CHUNK * FRAME])
            if keep_open:
                await c.wait_closed(30)
            else:
                await c.wait_output_frames(2 * CHUNK, timeout=30)
                await c.close()
            await ended(srv)
            return c

    probe = server("--memory-store", str(tmp_path / "probe"))
    try:
        run(one(probe, "127.0.0.10", False))
        size = next((tmp_path / "probe").glob("*.mem")).stat().st_size  # one memory of 2 chunks
    finally:
        probe.stop()
    store = tmp_path / "store"
    srv = server("--memory-store", str(store), "--memory-max-bytes", str(int(1.5 * size)))
    try:
        first = run(one(srv, "127.0.0.11", False))
        second = run(one(srv, "127.0.0.12", True))
    finally:
        srv.stop()
    assert second.errors and second.errors[0].startswith("memory refused: the memory store is full"), second.errors
    assert second.close_code == 1013
    assert len(list(store.glob("*.mem"))) == 1 and stored(store, first.memory()["token"]).frames == 2 * CHUNK

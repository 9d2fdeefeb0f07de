"""Memory bytes between the web process and the model worker go as sealed files (`server.link.bulk`), never through
the control pipe and never as plaintext on disk: the worker's reply carries a `Bulk` reference, read (and removed)
exactly once; names from the other side stay inside the directory; dead servers' directories are swept."""

import os
import time

import pytest
from moshi_ttt.server.link import bulk
from moshi_ttt.server.link.messages import Reply
from moshi_ttt.server.link.worker import _Bridge

from moshi_ttt.memory.header import MAGIC


def _channel(tmp_path) -> bulk.Channel:
    return bulk.Channel.new(str(tmp_path))


def _file(channel: bulk.Channel, ref: bulk.Bulk) -> str:
    return str(channel.path(ref.name))


def test_put_take_round_trip_seals_and_removes_the_file(tmp_path):
    ch = _channel(tmp_path)
    data = os.urandom(100_003) + MAGIC.encode()
    ref = bulk.put(data, ch)
    on_disk = open(_file(ch, ref), "rb").read()
    assert ref.size == len(data) and data not in on_disk and MAGIC.encode() not in on_disk  # no plaintext
    assert oct(os.stat(_file(ch, ref)).st_mode & 0o777) == "0o600"
    assert bulk.take(ref, ch) == data
    assert not os.path.exists(_file(ch, ref))
    with pytest.raises(OSError):
        bulk.take(ref, ch)  # read once


def test_another_key_a_short_file_or_a_path_is_refused(tmp_path):
    ch = _channel(tmp_path)
    ref = bulk.put(b"abcdef", ch)
    with pytest.raises(OSError, match="not sealed by this server"):
        bulk.take(ref, bulk.Channel(ch.directory, os.urandom(32)))  # another process's key
    ref = bulk.put(b"abcdef", ch)
    with open(_file(ch, ref), "r+b") as f:
        f.truncate(os.path.getsize(_file(ch, ref)) - 3)
    with pytest.raises(OSError, match="not sealed by this server"):
        bulk.take(ref, ch)
    outside = tmp_path.parent / "outside.bulk"
    outside.write_bytes(b"x")
    for name in ("../outside.bulk", str(outside), f"../{'0' * 32}.bulk", f"{'0' * 32}.bulk/..", "x.bulk"):
        with pytest.raises(OSError, match="not a transfer file name"):
            bulk.take(bulk.Bulk(name, 1), ch)
    assert outside.exists()  # a name from the other side never reaches a file outside the directory
    ref = bulk.put(b"x", ch)
    bulk.discard({"data": ref, "frames": 1}, ch)
    assert list(tmp_path.iterdir()) == []


def test_sweep_removes_the_directories_of_dead_servers_only(tmp_path):
    dead = tmp_path / f"{bulk.PREFIX}999999999-abc"  # no such pid
    live = tmp_path / f"{bulk.PREFIX}{os.getpid()}-abc"
    legacy_old, legacy_new = tmp_path / f"{bulk.PREFIX}a1b2c3d4", tmp_path / f"{bulk.PREFIX}e5f6g7h8"
    other = tmp_path / "unrelated"
    for d in (dead, live, legacy_old, legacy_new, other):
        d.mkdir()
        (d / "f.bulk").write_bytes(b"memory")
    old = time.time() - bulk.LEGACY_AGE_S - 10
    os.utime(legacy_old, (old, old))
    assert sorted(bulk.sweep(str(tmp_path))) == sorted([str(dead), str(legacy_old)])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, legacy_new.name, other.name])


def _bridge(tmp_path, sent: list, w: int) -> _Bridge:
    bridge = _Bridge(engine=None, ctrl=None, wake_in=None, wake_out=os.fdopen(w, "wb"), relay=None,
                     send=sent.append)
    bridge.bulk = _channel(tmp_path)
    return bridge


def test_the_workers_memory_reply_carries_a_sealed_file_not_the_bytes(tmp_path):
    r, w = os.pipe()
    sent = []
    try:
        bridge = _bridge(tmp_path, sent, w)
        bridge._replier(7)(True, {"data": b"memory file bytes", "frames": 12})
        bridge._replier(8)(False, "refused: another model")
        bridge._replier(9)(True, {"frames": 12, "telemetry": {}})
    finally:
        os.close(r)
    (kind, req, ok, payload), refusal, restored = ((type(m), m.req, m.ok, m.payload) for m in sent)
    assert (kind, req, ok) == (Reply, 7, True) and payload["frames"] == 12
    assert isinstance(payload["data"], bulk.Bulk) and bulk.take(payload["data"], bridge.bulk) == b"memory file bytes"
    assert refusal == (Reply, 8, False, "refused: another model")
    assert restored == (Reply, 9, True, {"frames": 12, "telemetry": {}})


def test_a_failed_bulk_write_in_the_worker_is_answered_at_once(tmp_path):
    """The transfer file cannot be written (here its directory is gone): the worker answers the request with the
    failure, so the web side does not wait out its timeout with the slot held."""
    r, w = os.pipe()
    sent = []
    try:
        bridge = _bridge(tmp_path / "gone", sent, w)
        bridge._replier(3)(True, {"data": b"memory file bytes", "frames": 4})
    finally:
        os.close(r)
    assert [(type(m), m.req, m.ok) for m in sent] == [(Reply, 3, False)], sent
    assert sent[0].payload.startswith("memory bytes to the web process:"), sent[0].payload


def _serve_config(*argv: str):
    import argparse

    from moshi_ttt.server.serve import add_args, serve_config

    p = argparse.ArgumentParser()
    add_args(p)
    return serve_config(p.parse_args(["--port", "0", "--max-conversations", "1", "--log-level", "warning", *argv]))


def _recording_private_dirs(monkeypatch) -> list[str]:
    made: list[str] = []
    real = bulk.private_dir

    def private_dir() -> str:
        made.append(real())
        return made[-1]
    monkeypatch.setattr(bulk, "private_dir", private_dir)
    return made


def test_the_worker_engine_removes_its_bulk_dir_when_it_stops_or_fails_to_start(monkeypatch, tmp_path):
    """The web process's `WorkerEngine` owns the directory: it is there while the worker serves and gone after
    `close`, and a worker that fails to start (here: a missing checkpoint folder) leaves none behind either."""
    import asyncio

    from moshi_ttt.server.link.remote import WorkerEngine

    made = _recording_private_dirs(monkeypatch)

    async def serve_then_close() -> bool:
        engine = WorkerEngine(_serve_config("--demo"))
        await engine.start()
        try:
            return os.path.isdir(made[0]) and engine.alive
        finally:
            await engine.close()

    async def fail_to_start() -> None:
        await WorkerEngine(_serve_config("--hf-repo", str(tmp_path / "missing"))).start()

    assert asyncio.run(serve_then_close())
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        asyncio.run(fail_to_start())
    assert len(made) == 2 and not any(os.path.exists(d) for d in made), made


def test_a_worker_whose_web_process_is_gone_removes_the_bulk_dir(tmp_path):
    """The web process died (its pipes reached EOF): nobody else will remove the directory."""
    class Stopped:
        def stop(self) -> None:
            pass

    r, w = os.pipe()
    try:
        bridge = _Bridge(engine=Stopped(), ctrl=None, wake_in=None, wake_out=os.fdopen(w, "wb"), relay=None,
                         send=None)
        bridge._flush_now = lambda: None
        bridge.bulk = bulk.Channel.new(bulk.private_dir())
        assert bridge._stop("the web process is gone") == 0
    finally:
        os.close(r)
    assert not os.path.exists(bridge.bulk.directory)


def test_a_killed_server_leaves_no_plaintext_and_its_bulk_dir_is_swept_at_restart(tmp_path, demo_ttt_yaml,
                                                                                   server_speech):
    """kill -9 of the web process and its worker while a remembered conversation checkpoints every chunk: what is
    left in $TMPDIR holds no memory file in clear, and the next server's start removes it."""
    import asyncio
    import signal

    import aiohttp
    from moshi_ttt.server.web.client import FRAME, ChatClient

    from support.launcher import ServeProcess

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    args = ["--max-conversations", "1", "--no-per-ip-limits", "--memory-store", tmp_path / "store",
            "--memory-save-every", "1", "--ttt-config", demo_ttt_yaml(chunk_size=8), "--log-level", "info"]
    srv = ServeProcess(tmp_path, args, env=dict(os.environ, TMPDIR=str(tmp)), omp_threads=1, new_session=True)

    async def talk_until_killed() -> list:
        async with aiohttp.ClientSession() as http:
            c = await ChatClient.connect(http, srv.ws_url, memory=True)
            n = await c.send_pcm(server_speech["a"][: 48 * FRAME])
            await c.wait_output_frames(n // 2, timeout=60)  # checkpoints every 8 frames are under way
            dirs = [p for p in tmp.iterdir() if p.name.startswith(bulk.PREFIX)]
            os.killpg(srv.pid, signal.SIGKILL)
            await c.close()
            return dirs

    with srv:
        dirs = asyncio.run(talk_until_killed())
        srv.wait(30)
    assert len(dirs) == 1 and dirs[0].exists(), dirs  # nobody was left to remove it
    left = [p for p in tmp.rglob("*") if p.is_file()]
    assert not any(MAGIC.encode() in p.read_bytes() for p in left), left  # sealed, if anything is left
    with srv:  # the restart sweeps the dead server's directory
        assert not dirs[0].exists()
        assert f"removed {dirs[0]}, left by a server that was killed" in srv.log_text()

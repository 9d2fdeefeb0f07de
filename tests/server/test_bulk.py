"""Memory bytes between the web process and the model worker go as files (`server.link.bulk`), never through the
control pipe: the worker's reply carries a `Bulk` reference, read (and removed) exactly once."""

import os

import pytest
from moshi_ttt.server.link import bulk
from moshi_ttt.server.link.messages import Reply
from moshi_ttt.server.link.worker import _Bridge


def test_put_take_round_trip_removes_the_file(tmp_path):
    data = os.urandom(100_003)
    ref = bulk.put(data, str(tmp_path))
    assert os.path.getsize(ref.path) == len(data) and ref.size == len(data)
    assert bulk.take(ref) == data
    assert not os.path.exists(ref.path)
    with pytest.raises(OSError):
        bulk.take(ref)  # read once


def test_a_short_file_is_an_error_and_discard_removes(tmp_path):
    ref = bulk.put(b"abcdef", str(tmp_path))
    with open(ref.path, "wb") as f:
        f.write(b"abc")
    with pytest.raises(OSError, match="3 bytes, expected 6"):
        bulk.take(ref)
    ref = bulk.put(b"x", str(tmp_path))
    bulk.discard({"data": ref, "frames": 1})
    assert list(tmp_path.iterdir()) == []


def test_the_workers_memory_reply_carries_a_file_not_the_bytes(tmp_path):
    r, w = os.pipe()
    sent = []
    try:
        bridge = _Bridge(engine=None, ctrl=None, wake_in=None, wake_out=os.fdopen(w, "wb"), relay=None,
                         send=sent.append)
        bridge.bulk_dir = str(tmp_path)
        bridge._replier(7)(True, {"data": b"memory file bytes", "frames": 12})
        bridge._replier(8)(False, "refused: another model")
        bridge._replier(9)(True, {"frames": 12, "telemetry": {}})
    finally:
        os.close(r)
    (kind, req, ok, payload), refusal, restored = ((type(m), m.req, m.ok, m.payload) for m in sent)
    assert (kind, req, ok) == (Reply, 7, True) and payload["frames"] == 12
    assert isinstance(payload["data"], bulk.Bulk) and bulk.take(payload["data"]) == b"memory file bytes"
    assert refusal == (Reply, 8, False, "refused: another model")
    assert restored == (Reply, 9, True, {"frames": 12, "telemetry": {}})


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
        bridge.bulk_dir = bulk.private_dir()
        assert bridge._stop("the web process is gone") == 0
    finally:
        os.close(r)
    assert not os.path.exists(bridge.bulk_dir)

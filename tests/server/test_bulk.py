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

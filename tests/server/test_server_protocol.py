"""Wire format and metrics of `server` (no model, fast); /metrics is parsed by prometheus_client's parser."""

import json
import math

import numpy as np
import pytest
import sphn
from moshi_ttt.server.metrics import Metrics
from moshi_ttt.server.web import protocol

from support.observe import parse_prometheus


def test_parse_accepts_every_kind_and_splits_payload():
    for kind in protocol.Kind:
        m = protocol.parse(bytes([kind]) + b"abc")
        assert m.kind == kind and m.payload == b"abc"
    assert protocol.parse(b"\x01").payload == b""


@pytest.mark.parametrize("data, needle, code", [
    (b"", "empty message", 1007),
    (b"\x07", "unknown message kind 0x07", 1003),
    (b"\xffxyz", "unknown message kind 0xff", 1003),
    (b"\x01" + bytes(2000), "message too large: 2001 bytes > limit 1024", 1009),
    ("text", "expected a binary message", 1003),
])
def test_parse_rejects_with_reason_and_close_code(data, needle, code):
    with pytest.raises(protocol.ProtocolError) as e:
        protocol.parse(data, max_bytes=1024)
    assert needle in e.value.reason and e.value.close_code == code


def test_server_messages_round_trip():
    assert protocol.handshake() == b"\x00"
    assert protocol.decode_server_message(protocol.text(" héllo")) == (protocol.Kind.TEXT, " héllo")
    assert protocol.decode_server_message(protocol.error("server busy")) == (protocol.Kind.ERROR, "server busy")
    kind, obj = protocol.decode_server_message(protocol.metadata({"a": [1, 2.5], "b": None}))
    assert kind == protocol.Kind.METADATA and obj == {"a": [1, 2.5], "b": None}
    ogg = sphn.OpusStreamWriter(24000).append_pcm(np.zeros(1920, np.float32))
    assert protocol.audio(ogg) == b"\x01" + ogg
    with pytest.raises(ValueError):  # metadata must be valid JSON: no NaN
        protocol.metadata({"x": math.nan})
    json.loads(protocol.metadata({"x": 1})[1:])


def test_metrics_render_parses_and_moves():
    m = Metrics(max_conversations=3)
    m.set_ttt_layers([0, 2])
    text = m.render().decode()
    fams = parse_prometheus(text)
    for name in ("conversations_active", "conversations_total", "conversations_rejected_total",
                 "frame_latency_seconds_count", "realtime_speed", "ttt_updates_total", "ttt_clips_total",
                 "ttt_skipped_total"):
        assert "moshi_ttt_" + name in fams, name
    assert "# TYPE moshi_ttt_ttt_drift gauge" in text  # no sample until a slot reports one
    assert fams[("TYPE", "moshi_ttt_frame_latency_seconds")] == "histogram"
    m.conversation_started()
    m.rejected_conversation("busy")
    m.set_active(1)
    for lat in (0.001, 0.03, 0.07, 3.0, 100.0):
        m.observe_frame_latency(lat)
    m.observe_step(0.02, 2, 3, 0.08)
    m.inc_ttt("0", "updates", 5)
    m.set_drift("0", 1, 0.25)
    m.set_drift("2", 1, None)  # non-finite drift → NaN, still valid exposition
    m.inc_error('odd "reason"\n')
    fams = parse_prometheus(m.render().decode())

    def value(sample, **labels):
        return [v for lb, v in fams["moshi_ttt_" + sample] if lb == labels]

    assert value("conversations_total") == [1]
    assert value("conversations_rejected_total", reason="busy") == [1]
    assert value("conversation_errors_total", reason='odd "reason"\n') == [1]
    assert value("conversations_active") == [1]
    assert value("ttt_updates_total", layer="0") == [5] and value("ttt_updates_total", layer="2") == [0]
    assert value("ttt_drift", layer="0", slot="1") == [0.25]
    assert math.isnan(value("ttt_drift", layer="2", slot="1")[0])
    # realtime speed = audio seconds / wall seconds: an 80 ms frame per 20 ms step is 4× real time for each
    # conversation, 8× summed over the step's 2 conversations
    assert value("realtime_speed") == [pytest.approx(4.0)]
    assert value("throughput_realtime_speed") == [pytest.approx(8.0)]
    assert not any("real_time_factor" in k or "rtf" in k for k in fams if isinstance(k, str))
    assert value("audio_seconds_total") == [pytest.approx(0.16)] and value("frames_total") == [2]
    lat = {lb["le"]: v for lb, v in fams["moshi_ttt_frame_latency_seconds_bucket"]}
    assert lat["0.005"] == 1 and lat["0.08"] == 3 and lat["5.0"] == 4 and lat["+Inf"] == 5
    snap = m.snapshot()
    assert snap["steps_total"] == 1 and snap["rejected"] == {"busy": 1} and snap["active"] == 1
    assert snap["realtime_speed"] == pytest.approx(4.0) and "real_time_factor" not in snap
    m.clear_drift(1)
    assert "slot=" not in m.render().decode()


def test_two_servers_keep_separate_metrics():
    a, b = Metrics(), Metrics()
    a.conversation_started()
    assert parse_prometheus(b.render().decode())["moshi_ttt_conversations_total"] == [({}, 0.0)]


def test_telemetry_query_parameter():
    assert protocol.telemetry_requested(None) is False and protocol.telemetry_requested("0") is False
    assert protocol.telemetry_requested("1") is True
    with pytest.raises(protocol.ProtocolError, match="telemetry='yes': expected 0 or 1"):
        protocol.telemetry_requested("yes")

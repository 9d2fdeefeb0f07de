"""Moshi's websocket wire format: binary messages whose first byte is the kind.

Kinds: 0x00 handshake (server → client, once the conversation is ready), 0x01 audio (Ogg Opus pages,
24 kHz mono, both ways), 0x02 text (UTF-8 piece, server → client), 0x03 control, 0x04 metadata (UTF-8
JSON), 0x05 error (UTF-8 reason, sent before any server-side close), 0x06 ping.

By default the server sends only what moshi's own server sends (`DEFAULT_SERVER_KINDS`): Kyutai's web
client rejects our 0x04 messages as malformed metadata. A client that connects with `?telemetry=1` also
gets 0x04: one "info" message (model, TTT layers) after the handshake and the TTT telemetry. A client that
connects with `?memory=1` or `?resume=TOKEN` (conversation memory, `memories`) has opted into 0x04 too: one
`{"memory": ...}` message after the handshake. A resumed conversation's client confirms the new token it was
sent with a client 0x04 `{"memory": {"confirm": NEW_TOKEN}}` (`memory_confirmation`); the server answers with
a 0x04 `{"memory": {"confirmed": true, ...}}` or `{"memory": {"error": ...}}`. Other client 0x04 JSON objects
are ignored. The whole protocol: docs/protocol.md.

`parse` validates one client message and raises `ProtocolError` (with a reason fit for a 0x05 and a
log line) for what the server cannot accept; the encoders build server messages.
"""

from __future__ import annotations

import enum
import json
import typing as tp
from dataclasses import dataclass

from ..core.reasons import Reason

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024  # an 80 ms Ogg page is ~300 bytes; the web client sends 40 ms pages


class Kind(enum.IntEnum):
    HANDSHAKE = 0
    AUDIO = 1
    TEXT = 2
    CONTROL = 3
    METADATA = 4
    ERROR = 5
    PING = 6


DEFAULT_SERVER_KINDS = frozenset({Kind.HANDSHAKE, Kind.AUDIO, Kind.TEXT, Kind.ERROR})
TELEMETRY_QUERY = "telemetry"  # ?telemetry=1: also send the 0x04 info and TTT telemetry messages
MEMORY_QUERY = "memory"  # ?memory=1: keep the conversation's memory; a 0x04 {"memory": {id, token, expires}}
RESUME_QUERY = "resume"  # ?resume=TOKEN: continue a remembered conversation
MEMORY_PATH = "/api/memory/"  # DELETE /api/memory/{id} with "Authorization: Bearer TOKEN"
MEMORY_UNAVAILABLE = Reason.MEMORY_UNAVAILABLE.head  # the one 0x05 refusal of a resume token (`reasons`)
MEMORY_CONFIRM = "confirm"  # client 0x04 {"memory": {"confirm": NEW_TOKEN}}: it holds a resume's new token


def flag_requested(name: str, value: str | None) -> bool:
    """A 0/1 query parameter: absent or "0" ⇒ False, "1" ⇒ True, anything else is refused."""
    if value is None or value == "0":
        return False
    if value == "1":
        return True
    raise ProtocolError(f"query parameter {name}={value!r}: expected 0 or 1", 1008)


def telemetry_requested(value: str | None) -> bool:
    """The `telemetry` query parameter (`flag_requested`)."""
    return flag_requested(TELEMETRY_QUERY, value)


class ProtocolError(ValueError):
    """A client message the server does not accept; `reason` goes into the 0x05 error message.

    `close_code` is the websocket close code to use after the 0x05 (RFC 6455: 1003 unsupported data,
    1007 invalid payload, 1009 too big, 1008 policy violation).
    """

    def __init__(self, reason: str, close_code: int = 1008):
        super().__init__(reason)
        self.reason = reason
        self.close_code = close_code


@dataclass(frozen=True)
class Message:
    kind: Kind
    payload: bytes


def parse(data: tp.Any, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """One client binary message → Message. Raises ProtocolError for empty, oversized, unknown kind."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"expected a binary message, got {type(data).__name__}", 1003)
    data = bytes(data)
    if len(data) == 0:
        raise ProtocolError("empty message (expected a kind byte)", 1007)
    if len(data) > max_bytes:
        raise ProtocolError(f"message too large: {len(data)} bytes > limit {max_bytes}", 1009)
    kind_byte = data[0]
    try:
        kind = Kind(kind_byte)
    except ValueError:
        raise ProtocolError(f"unknown message kind 0x{kind_byte:02x}", 1003) from None
    return Message(kind, data[1:])


def client_metadata(payload: bytes) -> dict:
    """A client 0x04 payload: a UTF-8 JSON object; `ProtocolError` (1007) for anything else."""
    try:
        obj = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"0x04 metadata must be a UTF-8 JSON object ({type(e).__name__})", 1007) from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"0x04 metadata must be a JSON object, got {type(obj).__name__}", 1007)
    return obj


def memory_confirmation(obj: tp.Mapping[str, tp.Any]) -> str | None:
    """The token a client 0x04 object confirms (`{"memory": {"confirm": TOKEN}}`), None when it is about
    something else (no "memory" key); ValueError naming what is wrong with a malformed one."""
    if "memory" not in obj:
        return None
    body = obj["memory"]
    if not isinstance(body, dict) or set(body) != {MEMORY_CONFIRM}:
        keys = sorted(body)[:5] if isinstance(body, dict) else type(body).__name__
        raise ValueError(f'malformed confirmation: expected {{"memory": {{"{MEMORY_CONFIRM}": TOKEN}}}}, got '
                         f"memory={keys!r}")
    token = body[MEMORY_CONFIRM]
    if not isinstance(token, str) or not token:
        raise ValueError(f"malformed confirmation: the token must be a non-empty string, got {type(token).__name__}")
    return token


def handshake() -> bytes:
    return bytes([Kind.HANDSHAKE])


def audio(ogg: bytes) -> bytes:
    return bytes([Kind.AUDIO]) + ogg


def text(piece: str) -> bytes:
    return bytes([Kind.TEXT]) + piece.encode("utf-8")


def metadata(obj: tp.Mapping[str, tp.Any]) -> bytes:
    return bytes([Kind.METADATA]) + json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")


def error(reason: str) -> bytes:
    return bytes([Kind.ERROR]) + reason.encode("utf-8")


def decode_server_message(data: bytes) -> tuple[Kind, tp.Any]:
    """Client-side helper (tests, bench): kind and decoded payload (bytes, str or JSON object)."""
    if not data:
        raise ProtocolError("empty message", 1007)
    kind = Kind(data[0])
    payload = data[1:]
    if kind in (Kind.TEXT, Kind.ERROR):
        return kind, payload.decode("utf-8")
    if kind == Kind.METADATA:
        return kind, json.loads(payload.decode("utf-8"))
    return kind, payload

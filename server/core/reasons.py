"""Why a conversation is refused or ends: the one table of reasons.

Each `Reason` has the label it is counted under (`conversations_rejected_total` for a refusal before the
handshake, `conversation_errors_total` for a served conversation that the server ends, `over_budget_total`
for a broken budget), the head of its message (the 0x05 error text and the close frame's message) and the
websocket close code. A message is `reason.says(detail)`: "head: detail", or the head alone. Nothing reads
a message back. Torch-free and aiohttp-free: the model worker's engine reports reasons too.
"""

from __future__ import annotations

import enum


class Close(enum.IntEnum):
    """The websocket close codes the server sends (RFC 6455; aiohttp's `WSCloseCode` names)."""

    OK = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    INVALID_TEXT = 1007
    POLICY_VIOLATION = 1008
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013


class Reason(enum.Enum):
    """label, message head, close code."""

    # refused before the handshake
    BUSY = ("busy", "server busy", Close.TRY_AGAIN_LATER)
    OVERLOADED_AT_START = ("overloaded", "server overloaded", Close.TRY_AGAIN_LATER)
    UNAVAILABLE = ("unavailable", "server unavailable", Close.TRY_AGAIN_LATER)
    # the one 0x05 refusal of a resume token, whatever the cause (unknown, wrong key, tampered, expired, deleted)
    MEMORY_UNAVAILABLE = ("memory_not_available",
                          "memory not available: this resume token does not open a memory on this server",
                          Close.POLICY_VIOLATION)
    # a new memory the store refuses (`?memory=1`, at its first save): the conversation ends with it
    MEMORY_QUOTA = ("memory_quota", "memory refused: this client's quota of stored memories (count or bytes) is "
                    "used up; delete one (DELETE /api/memory/{id}) or wait for one to expire", Close.POLICY_VIOLATION)
    MEMORY_STORE_FULL = ("memory_store_full", "memory refused: the memory store is full, try again later",
                         Close.TRY_AGAIN_LATER)
    # a served conversation ended by the server
    INTERNAL = ("internal_error", "internal error", Close.INTERNAL_ERROR)
    STEP_FAILED = ("internal_error_during_step", "internal error during step", Close.INTERNAL_ERROR)
    WORKER_RESTARTED = ("model_worker_restarted", "model worker restarted", Close.INTERNAL_ERROR)
    SHUTTING_DOWN = ("server_shutting_down", "server shutting down", Close.GOING_AWAY)
    OVERLOADED = ("server_overloaded", "server overloaded", Close.TRY_AGAIN_LATER)
    IDLE = ("idle_timeout", "idle timeout", Close.OK)
    CLIENT_TOO_SLOW = ("client_too_slow", "client too slow", Close.POLICY_VIOLATION)
    TOO_FAST = ("too_much_audio_queued", "too much audio queued", Close.POLICY_VIOLATION)
    PROTOCOL_ERROR = ("protocol_error", "protocol error", Close.POLICY_VIOLATION)
    WEBSOCKET_ERROR = ("websocket_error", "websocket error", Close.PROTOCOL_ERROR)
    INVALID_AUDIO = ("invalid_audio", "invalid audio", Close.INVALID_TEXT)
    # a broken budget (`limits`): also counted under its label in over_budget_total
    TOO_MANY_MESSAGES = ("too_many_messages", "too many messages", Close.POLICY_VIOLATION)
    TOO_MANY_BYTES = ("too_many_bytes", "too many bytes", Close.POLICY_VIOLATION)
    TOO_MANY_PINGS = ("too_many_pings", "too many pings", Close.POLICY_VIOLATION)

    def __init__(self, label: str, head: str, close: Close):
        self.label, self.head, self.close = label, head, close

    def says(self, detail: str = "") -> str:
        return f"{self.head}: {detail}" if detail else self.head


# What a claim, a memory request or a refusal says while the model worker is down (EngineClosed, MemoryOpFailed).
WORKER_RESTARTING = "the model worker is restarting"


def busy(slots: int) -> str:
    """The busy refusal's message: at the upgrade (HTTP 503) and after it (0x05)."""
    return Reason.BUSY.says(f"all {slots} conversation slots are in use, try again later")

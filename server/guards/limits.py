"""Per-connection budgets: what one websocket client may make the server do per second.

Every message a client sends costs event-loop time (and, through the GIL, model time) whether the
server uses it or not: ignored kinds, 0x06 pings, websocket PING/PONG frames. Each connection gets
three token buckets — messages, bytes, websocket control frames — refilled at a steady rate and
holding `burst` seconds of it. A message the bucket cannot pay for ends the conversation (0x05 with
the reason, then the connection is closed without waiting for the client's close frame).

A client streaming at 1× sends 12.5–25 messages and a few KB per second: far below the defaults,
and the burst absorbs a client that catches up after a network stall (tens of seconds of audio).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..core.reasons import Reason

DEFAULT_MESSAGES_PER_S = 50.0
DEFAULT_BYTES_PER_S = 256 * 1024
DEFAULT_PINGS_PER_S = 2.0
DEFAULT_BURST_S = 10.0


@dataclass(frozen=True)
class Budget:
    """Sustained rates per connection; each bucket holds `burst_s` seconds of its rate (at least one
    message of `min_bytes` for the byte bucket, so the largest accepted message always fits)."""

    messages_per_s: float = DEFAULT_MESSAGES_PER_S
    bytes_per_s: float = DEFAULT_BYTES_PER_S
    pings_per_s: float = DEFAULT_PINGS_PER_S
    burst_s: float = DEFAULT_BURST_S

    def __post_init__(self) -> None:
        for name in ("messages_per_s", "bytes_per_s", "pings_per_s", "burst_s"):
            v = getattr(self, name)
            if not (v > 0):
                raise ValueError(f"budget {name} must be > 0, got {v!r}")


class TokenBucket:
    """`rate` tokens per second, at most `capacity` stored; starts full."""

    __slots__ = ("rate", "capacity", "tokens", "stamp")

    def __init__(self, rate: float, capacity: float, now: float | None = None):
        self.rate = float(rate)
        self.capacity = float(capacity)
        self.tokens = self.capacity
        self.stamp = time.monotonic() if now is None else now

    def take(self, n: float, now: float) -> bool:
        """Pays `n` tokens if the bucket holds them; False (and nothing paid) otherwise."""
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < n:
            return False
        self.tokens -= n
        return True


class ConnectionBudget:
    """The three buckets of one connection. `charge` returns None while within budget, else the reason
    (which names the limit that was exceeded) and its detail, for the 0x05."""

    def __init__(self, budget: Budget, min_bytes: int = 0):
        now = time.monotonic()
        self.budget = budget
        self.messages = TokenBucket(budget.messages_per_s, budget.messages_per_s * budget.burst_s, now)
        self.bytes = TokenBucket(budget.bytes_per_s, max(budget.bytes_per_s * budget.burst_s, 2 * min_bytes), now)
        self.pings = TokenBucket(budget.pings_per_s, max(1.0, budget.pings_per_s * budget.burst_s), now)

    def charge(self, nbytes: int, control: bool = False) -> tuple[Reason, str] | None:
        """One message of `nbytes` (websocket payload); `control`: a websocket PING/PONG frame."""
        now = time.monotonic()
        b = self.budget
        if control:
            if not self.pings.take(1, now):
                return Reason.TOO_MANY_PINGS, (f"more than {b.pings_per_s:g} websocket pings per second "
                                               f"(burst {self.pings.capacity:g})")
        elif not self.messages.take(1, now):
            return Reason.TOO_MANY_MESSAGES, (f"more than {b.messages_per_s:g} messages per second "
                                              f"(burst {self.messages.capacity:g})")
        if not self.bytes.take(nbytes, now):
            return Reason.TOO_MANY_BYTES, (f"more than {b.bytes_per_s:g} bytes per second "
                                           f"(burst {self.bytes.capacity:g})")
        return None

"""Admission bounded per client address, decided at the websocket upgrade, before any slot is claimed
(a refused upgrade costs no reset and no model work: it is an HTTP answer).

Per address: at most `max_per_ip` open conversations; conversation starts paid from a token bucket of
`starts_per_minute` holding `start_burst`; an address whose conversations were cut for abuse (over a
budget, audio flood) `ban_after` times within `ban_window` seconds is refused for `ban_seconds` (a
direct peer's connections are then aborted on accept, unparsed: `banned`). Failed memory resumes and
deletes (a token that opens nothing) are paid from a bucket of `memory_failures_per_minute` holding
`memory_failure_burst`: once it is empty the address's resumes and deletes are refused (429) until it
refills, so that tokens cannot be guessed at speed.

Every per-address budget is kept per address group (`address_group`): an IPv4 address, or the /64 of an IPv6
address (the prefix one subscriber gets; its 2**64 addresses are one client).

The address is the TCP peer, unless the peer is one of `trusted_proxies`: then it is the right-most
address of `X-Forwarded-For` (all its header lines, in order: HAProxy adds its own line after the
client's) that is not itself a trusted proxy. The header is never read from anyone else, so a client
cannot choose its own address.
"""

from __future__ import annotations

import collections
import ipaddress
import time
import typing as tp
from dataclasses import dataclass, field

from .limits import TokenBucket

DEFAULT_MAX_PER_IP = 2
DEFAULT_STARTS_PER_MINUTE = 10.0
DEFAULT_START_BURST = 10
DEFAULT_BAN_AFTER = 3
DEFAULT_BAN_WINDOW_S = 300.0
DEFAULT_BAN_S = 120.0
DEFAULT_MEMORY_FAILURES_PER_MINUTE = 6.0
DEFAULT_MEMORY_FAILURE_BURST = 10
MAX_TRACKED = 100_000  # addresses kept; idle ones are forgotten first
IPV6_GROUP_PREFIX = 64  # bits of an IPv6 address that name one client


def address_group(addr: str) -> str:
    """The budget key of `addr`: an IPv4 address itself (also written as IPv4-mapped IPv6), an IPv6 address's
    /64 network ("2001:db8:1:2::/64"); anything that is not an IP address (a test's "?") is its own group."""
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return addr
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if ip.version == 4:
        return str(ip)
    return str(ipaddress.ip_network(f"{ip}/{IPV6_GROUP_PREFIX}", strict=False))


def parse_networks(specs: tp.Iterable[str]) -> tuple:
    """'127.0.0.1', '10.0.0.0/8', '::1' → ip networks; ValueError naming the bad entry."""
    out = []
    for s in specs:
        try:
            out.append(ipaddress.ip_network(s.strip(), strict=False))
        except ValueError:
            raise ValueError(f"--trusted-proxies: {s!r} is not an IP address or network") from None
    return tuple(out)


@dataclass(frozen=True)
class AdmissionLimits:
    max_per_ip: int = DEFAULT_MAX_PER_IP  # 0 = no limit
    starts_per_minute: float = DEFAULT_STARTS_PER_MINUTE  # 0 = no limit
    start_burst: int = DEFAULT_START_BURST
    ban_after: int = DEFAULT_BAN_AFTER  # 0 = never ban
    ban_window: float = DEFAULT_BAN_WINDOW_S
    ban_seconds: float = DEFAULT_BAN_S
    trusted_proxies: tuple = field(default_factory=tuple)  # ip networks
    memory_failures_per_minute: float = DEFAULT_MEMORY_FAILURES_PER_MINUTE  # 0 = no limit
    memory_failure_burst: int = DEFAULT_MEMORY_FAILURE_BURST

    def __post_init__(self) -> None:
        for name in ("max_per_ip", "starts_per_minute", "ban_after", "memory_failures_per_minute"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("start_burst", "memory_failure_burst"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("ban_window", "ban_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")

    @classmethod
    def off(cls) -> AdmissionLimits:
        """No per-address limit at all (trusted networks, tests)."""
        return cls(max_per_ip=0, starts_per_minute=0, ban_after=0, memory_failures_per_minute=0)


class _Addr:
    __slots__ = ("open", "starts", "cuts", "banned_until", "seen", "memory_failures")

    def __init__(self, limits: AdmissionLimits, now: float):
        self.open = 0
        self.starts = TokenBucket(limits.starts_per_minute / 60, limits.start_burst, now) \
            if limits.starts_per_minute > 0 else None
        self.memory_failures = TokenBucket(limits.memory_failures_per_minute / 60, limits.memory_failure_burst, now) \
            if limits.memory_failures_per_minute > 0 else None
        self.cuts: collections.deque[float] = collections.deque()
        self.banned_until = 0.0
        self.seen = now


@dataclass(frozen=True)
class Refusal:
    status: int  # HTTP status of the answer to the upgrade
    reason: str  # for the body and the log
    retry_after: float  # seconds (Retry-After header)
    label: str  # metrics label


class Admission:
    """The per-address state of one server (event loop thread only)."""

    def __init__(self, limits: AdmissionLimits | None = None):
        self.limits = limits or AdmissionLimits()
        self._addrs: collections.OrderedDict[str, _Addr] = collections.OrderedDict()

    # -- who is it -------------------------------------------------------------------------------------

    def _trusted(self, addr: str) -> bool:
        if not self.limits.trusted_proxies:
            return False
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in self.limits.trusted_proxies)

    def proxied(self, peer: str | None) -> bool:
        """The connection comes from a trusted proxy."""
        return self._trusted(peer or "")

    def client_address(self, peer: str | None, forwarded_for: str | None) -> str:
        """The client's address (see the module doc); `peer` when the header cannot be trusted."""
        peer = peer or "?"
        if not forwarded_for or not self._trusted(peer):
            return peer
        hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
        for hop in reversed(hops):
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                return peer  # a malformed chain: trust nothing in it
            if not self._trusted(hop):
                return hop
        return hops[0] if hops else peer

    # -- the decision ------------------------------------------------------------------------------------

    def _get(self, addr: str, now: float) -> _Addr:
        addr = address_group(addr)
        a = self._addrs.get(addr)
        if a is None:
            a = self._addrs[addr] = _Addr(self.limits, now)
            if len(self._addrs) > MAX_TRACKED:
                self._forget(now)
        else:
            self._addrs.move_to_end(addr)
        a.seen = now
        return a

    def _forget(self, now: float) -> None:
        for key in list(self._addrs)[: len(self._addrs) // 10 or 1]:  # least recently seen first
            a = self._addrs[key]
            if a.open == 0 and a.banned_until <= now:
                del self._addrs[key]

    def banned(self, peer: str) -> bool:
        """`peer` (a TCP peer, not a trusted proxy) is banned: its connections are aborted on accept,
        before a byte of HTTP is parsed."""
        a = self._addrs.get(address_group(peer))
        return a is not None and a.banned_until > time.monotonic() and not self._trusted(peer)

    def refusal(self, addr: str) -> Refusal | None:
        """None: `addr` may start a conversation now (its start is paid and counted as open: call
        `closed` when it ends). Else why not."""
        lim = self.limits
        now = time.monotonic()
        a = self._get(addr, now)
        if a.banned_until > now:
            left = a.banned_until - now
            return Refusal(429, f"address {addr} refused for {left:.0f} s more: its conversations were cut for "
                                f"abuse {lim.ban_after} times", left, "banned")
        if lim.max_per_ip and a.open >= lim.max_per_ip:
            return Refusal(429, f"address {addr} already has {a.open} open conversations (at most "
                                f"{lim.max_per_ip} per address)", 5.0, "per_ip")
        if a.starts is not None and not a.starts.take(1, now):
            wait = (1 - a.starts.tokens) / a.starts.rate
            return Refusal(429, f"address {addr} starts conversations too fast (at most {lim.starts_per_minute:g} "
                                f"a minute, burst {lim.start_burst})", wait, "start_rate")
        a.open += 1
        return None

    def closed(self, addr: str, abusive: bool = False) -> None:
        """A conversation admitted by `refusal` ended; `abusive`: it was cut for abuse."""
        now = time.monotonic()
        a = self._get(addr, now)
        a.open = max(0, a.open - 1)
        lim = self.limits
        if not abusive or not lim.ban_after:
            return
        a.cuts.append(now)
        while a.cuts and now - a.cuts[0] > lim.ban_window:
            a.cuts.popleft()
        if len(a.cuts) >= lim.ban_after:
            a.cuts.clear()
            a.banned_until = now + lim.ban_seconds

    def memory_refusal(self, addr: str) -> Refusal | None:
        """None: `addr` may try a memory resume or delete now; else its failure budget is spent."""
        now = time.monotonic()
        bucket = self._get(addr, now).memory_failures
        if bucket is None or bucket.take(0, now) and bucket.tokens >= 1:
            return None
        lim = self.limits
        return Refusal(429, f"address {addr}: too many failed memory resumes or deletes (at most "
                            f"{lim.memory_failures_per_minute:g} a minute, burst {lim.memory_failure_burst})",
                       (1 - bucket.tokens) / bucket.rate, "memory_failures")

    def memory_failed(self, addr: str) -> None:
        """A resume or delete from `addr` named no memory it could open: paid from its failure budget."""
        now = time.monotonic()
        bucket = self._get(addr, now).memory_failures
        if bucket is not None:
            bucket.take(0, now)  # refill up to now
            bucket.tokens = max(0.0, bucket.tokens - 1)

    def open_count(self, addr: str) -> int:
        a = self._addrs.get(address_group(addr))
        return a.open if a is not None else 0


__all__ = ["Admission", "AdmissionLimits", "Refusal", "address_group", "parse_networks"]

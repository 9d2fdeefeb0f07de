"""Who may talk to the server: the API key, the websocket Origin and the Host name.

- API key: from `--api-key`, `--api-key-file` or `$MOSHI_TTT_API_KEY` (in that order). Printable
  ASCII without spaces; an empty or invalid value is an error at start, never "no key". A request's
  key is compared in constant time; a non-ASCII key in a request is simply wrong (401).
- Origin: a browser page on any site can open a websocket to a local server (browsers do not apply
  CORS to websockets). Upgrades are accepted from no-Origin clients (native clients send none), from
  the server's own origin (Origin host:port = Host) and from `--allowed-origins`.
- Host: with a loopback bind, only loopback Host names (and the hosts of `--allowed-origins`) are
  served, so a DNS-rebound name cannot read `/health` or `/metrics` from a browser.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

API_KEY_ENV = "MOSHI_TTT_API_KEY"
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


# -- API key ------------------------------------------------------------------------------------------


def _check_key(key: str, source: str) -> str:
    if not key:
        raise ValueError(f"{source} is empty: give a key, or leave it out to serve without one")
    if not all(33 <= ord(c) <= 126 for c in key):
        raise ValueError(f"{source}: the API key must be printable ASCII without spaces")
    return key


def resolve_api_key(flag: str | None, file: str | None, env: tp.Mapping[str, str] | None = None) -> str | None:
    """The server's API key, or None for no key. ValueError (one line, never showing the key) for an
    empty or non-ASCII key, an unreadable key file, or both flags at once."""
    env = os.environ if env is None else env
    if flag is not None and file is not None:
        raise ValueError("--api-key and --api-key-file: give only one")
    if flag is not None:
        return _check_key(flag, "--api-key")
    if file is not None:
        path = Path(file)
        try:
            text = path.read_bytes().decode("ascii")
        except OSError as e:
            raise ValueError(f"--api-key-file {path}: cannot read it ({e.strerror or e})") from None
        except UnicodeDecodeError:
            raise ValueError(f"--api-key-file {path}: the API key must be printable ASCII without spaces") from None
        return _check_key(text.strip(), f"--api-key-file {path}")
    if API_KEY_ENV in env:
        return _check_key(env[API_KEY_ENV], f"${API_KEY_ENV}")
    return None


def key_matches(given: str | None, key: str) -> bool:
    """Constant-time comparison; a missing or non-ASCII key never matches."""
    if given is None or not given.isascii():
        return False
    return hmac.compare_digest(given.encode("ascii"), key.encode("ascii"))


# -- Origin and Host ----------------------------------------------------------------------------------


def is_loopback_host(host: str) -> bool:
    """'localhost', '*.localhost', 127.0.0.0/8, ::1 (brackets allowed)."""
    h = host.strip().lower().rstrip(".")
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _host_port(netloc: str, default_port: int | None) -> tuple[str, int | None] | None:
    """'Host:port' (or '[v6]:port') → (lower-case host, port); None if malformed."""
    try:
        parts = urlsplit("//" + netloc)
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host or parts.username is not None or parts.path:
        return None
    return host.lower().rstrip("."), port if port is not None else default_port


def parse_origin(origin: str) -> tuple[str, str, int | None] | None:
    """'scheme://host[:port]' → (scheme, host, port with the scheme's default); None if not one."""
    try:
        parts = urlsplit(origin.strip())
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or parts.path not in ("", "/") or parts.query or parts.fragment:
        return None
    hp = _host_port(parts.netloc, _DEFAULT_PORTS[scheme])
    return None if hp is None else (scheme, *hp)


@dataclass(frozen=True)
class AccessPolicy:
    allowed_origins: tuple[str, ...] = ()  # as given to --allowed-origins (checked by `from_flags`)
    loopback_only: bool = True  # the server is bound to a loopback address
    _origins: frozenset = field(default=frozenset(), repr=False)

    @classmethod
    def from_flags(cls, origins: tp.Sequence[str], bind_host: str) -> AccessPolicy:
        parsed = []
        for o in origins:
            p = parse_origin(o)
            if p is None:
                raise ValueError(f"--allowed-origins: {o!r} is not an origin (expected scheme://host[:port], "
                                 "e.g. https://chat.example.com)")
            parsed.append(p)
        return cls(tuple(origins), is_loopback_host(bind_host), frozenset(parsed))

    def host_refusal(self, host_header: str | None, secure: bool) -> str | None:
        """None if the Host header may be served, else the reason (for a 403)."""
        if not self.loopback_only or not host_header:
            return None
        hp = _host_port(host_header, 443 if secure else 80)
        if hp is not None and (is_loopback_host(hp[0]) or any(hp[0] == o[1] for o in self._origins)):
            return None
        return (f"Host {host_header!r} is not a loopback name; this server is bound to loopback "
                "(add the public origin with --allowed-origins when serving through a proxy)")

    def origin_refusal(self, origin: str | None, host_header: str | None, secure: bool) -> str | None:
        """None if a websocket upgrade with this Origin may proceed, else the reason (for a 403)."""
        if origin is None:
            return None
        parsed = parse_origin(origin)
        if parsed is not None:
            if parsed in self._origins:
                return None
            own = _host_port(host_header or "", 443 if secure else 80)
            if own is not None and (parsed[1], parsed[2]) == own:
                return None
        return (f"Origin {origin[:100]!r} is not allowed: only the server's own origin and no-Origin clients "
                "are accepted (add it with --allowed-origins)")

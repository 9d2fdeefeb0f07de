"""Raw probes of a running `moshi-ttt serve` (started by `launcher.ServeProcess`) for the hardening tests:
raw HTTP and websocket bytes on plain sockets, floods, and RSS (tests/server/test_server_limits.py,
test_server_abuse.py)."""

import threading
import time


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def host_port(url: str) -> tuple[str, int]:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    return host, int(port)


def raw_request(url: str, data: bytes, timeout: float = 10.0) -> bytes:
    """Sends raw bytes on a fresh TCP connection and returns everything the server answers until it
    closes (or `timeout`)."""
    import socket

    with socket.create_connection(host_port(url), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return out


def ws_handshake(url: str, extra_headers: str = "", timeout: float = 10.0, source: str | None = None):
    """A raw websocket upgrade to /api/chat (from the local address `source`, default any): returns (socket,
    status line, bytes after the headers)."""
    s, head, rest = ws_upgrade(url, extra_headers, timeout, source)
    return s, head.split("\r\n", 1)[0], rest


def ws_upgrade(url: str, extra_headers: str = "", timeout: float = 10.0, source: str | None = None):
    """As `ws_handshake`, with the whole response head (status line and headers) instead of the status line."""
    import socket

    host, port = host_port(url)
    s = socket.create_connection((host, port), timeout=timeout,
                                 source_address=None if source is None else (source, 0))
    s.sendall((f"GET /api/chat HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
               f"{extra_headers}\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return s, head.decode(), rest


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """One masked client frame (payload < 126 bytes), mask 0 (payload unchanged)."""
    assert len(payload) < 126
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


def flood(url: str, frame: bytes, wait_for: bytes, limit: float = 10.0, headers: str = "") -> tuple[float, bytes]:
    """Upgrades to a websocket, waits for `wait_for` from the server (the 0x00 handshake, or the busy
    0x05), then sends `frame` as fast as the socket drains. Returns (seconds from the first flood byte
    until the server dropped the connection, everything the server sent)."""
    s, line, rest = ws_handshake(url, headers)
    assert " 101 " in line + " ", line
    got = bytearray(rest)
    seen = threading.Event()
    eof = threading.Event()

    def reader():
        try:
            while True:
                if wait_for in got:
                    seen.set()
                chunk = s.recv(65536)
                if not chunk:
                    break
                got.extend(chunk)
        except OSError:
            pass
        finally:
            seen.set()
            eof.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    assert seen.wait(10), "no handshake / busy message"
    chunk = frame * 20000
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < limit and not eof.is_set():
            s.sendall(chunk)
    except OSError:
        pass
    eof.wait(max(0.0, limit - (time.monotonic() - t0)))
    dt = time.monotonic() - t0
    s.close()
    t.join(5)
    return dt, bytes(got)

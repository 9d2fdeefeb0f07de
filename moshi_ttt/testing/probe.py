"""Raw probes of a running `moshi-ttt serve` for the hardening tests: a server subprocess, raw HTTP and
websocket bytes on plain sockets, floods, and RSS (tests/test_server_limits.py, test_server_abuse.py)."""

import threading
import time

# ---- a `moshi-ttt serve` subprocess, raw sockets (tests/test_server_limits.py, test_server_abuse.py) ----


def start_cli_server(argv, workdir, env_extra=None, timeout: float = 120.0):
    """Starts `python -m moshi_ttt.apps.cli serve --demo --port 0 ... argv` (stderr to workdir/stderr.txt);
    returns (proc, base url) once it listens."""
    import os
    import re
    import subprocess
    import sys
    import time

    env = dict(os.environ, NO_TORCH_COMPILE="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("MOSHI_TTT_API_KEY", None)
    env.update(env_extra or {})
    err = open(workdir / "stderr.txt", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moshi_ttt", "serve", "--demo", "--port", "0",
                             "--cache-dir", str(workdir / "cache"), *argv],
                            stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    proc.stderr_file = err
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        m = re.search(r"listening on (http://\S+)", line or "")
        if m:
            return proc, m.group(1)
        if not line:
            break
    proc.kill()
    proc.wait()
    err.close()
    raise AssertionError("server did not start:\n" + (workdir / "stderr.txt").read_text()[-3000:])


def stop_cli_server(proc, timeout: float = 30.0) -> int:
    import signal

    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr_file.close()
        proc.stdout.close()


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


def ws_handshake(url: str, extra_headers: str = "", timeout: float = 10.0):
    """A raw websocket upgrade to /api/chat: returns (socket, status line, bytes after the headers)."""
    import socket

    host, port = host_port(url)
    s = socket.create_connection((host, port), timeout=timeout)
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
    return s, head.split(b"\r\n", 1)[0].decode(), rest


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

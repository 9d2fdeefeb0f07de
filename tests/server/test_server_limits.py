"""`moshi-ttt serve` against hostile HTTP (a real subprocess on loopback): header limits, header
timeout (idle, slowloris), the pending-connection cap (in all and per address), no pipelining, no
permessage-deflate, Origin/Host checks, the API key
(file, non-ASCII, empty), and the one-line errors of `serve`/`infer` for bad keys, configs and outputs."""

import socket
import subprocess
import sys
import threading
import time

import pytest

from support.launcher import ServeProcess
from support.probe import flood, host_port, raw_request, rss_mb, ws_frame, ws_handshake, ws_upgrade

KEY = "k3y-from-a-file"
HEADER_TIMEOUT = 1.0
PENDING = 8
PENDING_PER_IP = 4


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    d = tmp_path_factory.mktemp("limited_server")
    (d / "key").write_text(KEY + "\n")
    srv = ServeProcess(d, ["--max-conversations", "1", "--api-key-file", d / "key", "--allowed-origins",
                           "http://a.example", "--header-timeout", HEADER_TIMEOUT, "--max-pending-connections",
                           PENDING, "--max-pending-per-ip", PENDING_PER_IP, "--log-level", "info"], omp_threads=1)
    with srv:
        yield srv
    log = srv.log_text()
    assert srv.returncode == 0, log[-3000:]
    assert "Traceback" not in log, log[-5000:]


def status(resp: bytes) -> int:
    assert resp.startswith(b"HTTP/1."), resp[:200]
    return int(resp.split(b" ", 2)[1])


def get(url: str, path: str = "/health", headers: str = "", host: str | None = None) -> bytes:
    h, p = host_port(url)
    return raw_request(url, f"GET {path} HTTP/1.1\r\nHost: {host or f'{h}:{p}'}\r\n{headers}\r\n".encode())


def test_header_limits_answer_400_without_memory_growth(limited):
    srv = limited
    url = srv.url
    assert status(get(url, headers="".join(f"X-H{i}: v\r\n" for i in range(99)))) == 200  # 100 headers: fine
    rss0 = rss_mb(srv.pid)
    assert status(get(url, headers="".join(f"X-H{i}: v\r\n" for i in range(101)))) == 400
    assert status(get(url, headers="X-Big: " + "a" * 16384 + "\r\n")) == 400
    # D4: many 8 KB headers, 4 connections in parallel, several rounds.
    flood = "".join(f"X-H{i}: {'b' * 8000}\r\n" for i in range(2000))
    for _ in range(3):
        results: list = []

        def one(out=results):
            out.append(get(url, headers=flood))

        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(results) == 4 and all(r == b"" or status(r) == 400 for r in results), [r[:80] for r in results]
    growth = rss_mb(srv.pid) - rss0
    assert growth < 50, f"RSS grew by {growth:.0f} MB"
    assert status(get(url)) == 200


def test_idle_and_slowloris_connections_are_closed(limited):
    url = limited.url

    def closed_after(slow: bool) -> float:
        t0 = time.monotonic()
        with socket.create_connection(host_port(url), timeout=10) as s:
            if slow:
                s.sendall(b"GET /health HTTP/1.1\r\n")
            s.settimeout(0.3)
            while time.monotonic() - t0 < 10:
                try:
                    if s.recv(1024) == b"":
                        return time.monotonic() - t0
                except TimeoutError:
                    if slow:
                        s.sendall(b"X-A: b\r\n")  # one header line every 0.3 s, never the blank line
                except ConnectionResetError:
                    return time.monotonic() - t0
        return float("inf")

    idle, slow = closed_after(False), closed_after(True)
    assert HEADER_TIMEOUT * 0.9 < idle < HEADER_TIMEOUT + 1.5, idle
    assert HEADER_TIMEOUT * 0.9 < slow < HEADER_TIMEOUT + 1.5, slow


def _aborted_at_once(s: socket.socket) -> bool:
    """The server closed `s` at once, long before the header timeout."""
    s.settimeout(0.5)
    try:
        return s.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_pending_connections_are_capped(limited):
    url = limited.url
    sources = [f"127.0.0.{20 + i // PENDING_PER_IP}" for i in range(PENDING)]  # each address within its own cap
    socks = [socket.create_connection(host_port(url), timeout=5, source_address=(a, 0)) for a in sources]
    try:
        time.sleep(0.2)
        with socket.create_connection(host_port(url), timeout=5, source_address=("127.0.0.30", 0)) as extra:
            assert _aborted_at_once(extra)
    finally:
        for s in socks:
            s.close()
    time.sleep(0.3)
    assert status(get(url)) == 200


def test_one_address_cannot_hold_every_pending_place(limited):
    """Slowloris heads and idle sockets from one address: past its share the address is refused on accept, and
    another address is still served."""
    url = limited.url
    h, p = host_port(url)

    def conn(source: str) -> socket.socket:
        return socket.create_connection((h, p), timeout=5, source_address=(source, 0))

    socks = [conn("127.0.0.40") for _ in range(PENDING_PER_IP)]
    try:
        for s in socks[::2]:
            s.sendall(b"GET /health HTTP/1.1\r\nX-Slow: ")  # a slowloris head; the others stay idle
        time.sleep(0.2)
        with conn("127.0.0.40") as extra:
            assert _aborted_at_once(extra)
        with conn("127.0.0.41") as other:
            other.sendall(f"GET /health HTTP/1.1\r\nHost: {h}:{p}\r\nConnection: close\r\n\r\n".encode())
            other.settimeout(5)
            assert other.recv(1024).startswith(b"HTTP/1.1 200")
    finally:
        for s in socks:
            s.close()
    time.sleep(0.3)
    with conn("127.0.0.40") as again:  # the address's places come back when its sockets close
        assert not _aborted_at_once(again)


def test_no_permessage_deflate(limited):
    """A client offering permessage-deflate gets a websocket without the extension."""
    url = limited.url
    s, head, _ = ws_upgrade(url, f"X-API-Key: {KEY}\r\nSec-WebSocket-Extensions: permessage-deflate; "
                                 "client_max_window_bits\r\n")
    s.close()
    time.sleep(0.2)  # the single slot is released on disconnect
    assert " 101 " in head.split("\r\n", 1)[0] + " ", head
    assert "sec-websocket-extensions" not in head.lower(), head


def test_pipelined_requests_get_one_response(limited):
    url = limited.url
    h, p = host_port(url)
    resp = raw_request(url, f"GET /health HTTP/1.1\r\nHost: {h}:{p}\r\n\r\n".encode() * 1000)
    assert resp.count(b"HTTP/1.1 200") == 1 and b"Connection: close" in resp, resp[:300]


def test_origin_and_host_checks(limited):
    url = limited.url
    h, p = host_port(url)
    key = f"X-API-Key: {KEY}\r\n"
    cases = {"Origin: http://evil.example\r\n": "403", "Origin: null\r\n": "403", "": "101",
             f"Origin: http://{h}:{p}\r\n": "101", "Origin: http://a.example\r\n": "101"}
    for origin, want in cases.items():
        s, line, _ = ws_handshake(url, key + origin)
        s.close()
        assert line.split(" ")[1] == want, (origin, line)
        time.sleep(0.2)  # the single slot is released on disconnect
    # Loopback bind: only loopback Host names (and the allowed origin's host) are served.
    assert status(get(url, host="evil.example")) == 403
    assert status(get(url, host=f"rebound.example:{p}")) == 403
    assert status(get(url, host="a.example")) == 200
    assert status(get(url, host=f"localhost:{p}")) == 200


def test_api_key_from_file_and_non_ascii_key(limited):
    url = limited.url
    assert status(get(url, "/metrics", headers=f"X-API-Key: {KEY}\r\n")) == 200
    h, p = host_port(url)
    for bad in (b"\xe9t\xe9", b"\xff" * 10, KEY.encode() + b"\xc3\xa9"):
        resp = raw_request(url, b"GET /metrics HTTP/1.1\r\nHost: " + f"{h}:{p}".encode() + b"\r\nX-API-Key: " + bad
                           + b"\r\n\r\n")
        assert status(resp) == 401, resp[:200]
    resp = get(url, "/metrics?api_key=%C3%A9")
    assert status(resp) == 401
    assert "Traceback" not in limited.log_text()


def test_flooders_are_cut_by_their_budget(limited):
    url = limited.url
    key = f"X-API-Key: {KEY}\r\n"
    for frame, reason in ((ws_frame(2, b"\x06"), b"too many messages"), (ws_frame(9, b"p"), b"too many pings"),
                          (ws_frame(2, b"\x03" + b"x" * 120), b"too many messages")):
        dt, got = flood(url, frame, b"\x82\x01\x00", headers=key)
        assert dt < 2.0 and reason in got, (reason, dt, got[-200:])
        time.sleep(0.3)  # the single slot is released


# ---- one-line errors at start ----------------------------------------------------------------------


def run_cli(args, tmp_path, env=None, timeout=120):
    import os

    e = dict(os.environ, NO_TORCH_COMPILE="1", HF_HUB_OFFLINE="1")
    e.pop("MOSHI_TTT_API_KEY", None)
    e.update(env or {})
    r = subprocess.run([sys.executable, "-m", "moshi_ttt", *args], capture_output=True, text=True, env=e,
                       timeout=timeout, cwd=tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    return r.returncode, lines, r.stderr


SERVE = ["serve", "--demo", "--port", "0"]


@pytest.mark.slow  # one `moshi-ttt` start-up per case
@pytest.mark.parametrize("case", ["empty flag", "empty env", "missing file", "empty file", "non-ascii"])
def test_bad_api_key_is_one_line(case, tmp_path):
    (tmp_path / "empty").write_text("\n")
    args, env, needle = {
        "empty flag": (["--api-key", ""], None, "--api-key is empty"),
        "empty env": ([], {"MOSHI_TTT_API_KEY": ""}, "$MOSHI_TTT_API_KEY is empty"),
        "missing file": (["--api-key-file", str(tmp_path / "nope")], None, "nope: cannot read it"),
        "empty file": (["--api-key-file", str(tmp_path / "empty")], None, "empty is empty"),
        "non-ascii": (["--api-key", "clé"], None, "printable ASCII"),
    }[case]
    code, lines, err = run_cli(SERVE + ["--cache-dir", str(tmp_path)] + args, tmp_path, env)
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("content,needle", [(b'{"chunk_size": 8,', "invalid JSON"),
                                            (b"\xff\xfe chunk_size: 8", "not a UTF-8 text file")])
def test_bad_config_names_its_file(content, needle, tmp_path):
    from moshi_ttt.testing.speech import espeak_wav

    espeak_wav(tmp_path / "in.wav", "hello there")
    bad = tmp_path / ("bad.json" if content.startswith(b"{") else "bad.yaml")
    bad.write_bytes(content)
    # a non-loopback bind without a key: warned about first, then the config error
    code, lines, err = run_cli(SERVE + ["--host", "0.0.0.0", "--cache-dir", str(tmp_path), "--ttt-config", str(bad)],
                               tmp_path)
    assert code == 2 and "Traceback" not in err, err
    assert len(lines) == 2 and "WITHOUT an API key" in lines[0], err
    assert str(bad) in lines[1] and needle in lines[1], err
    code, lines, err = run_cli(["infer", "--demo", "in.wav", "out.wav", "--ttt-config", str(bad)], tmp_path)
    assert code == 2 and len(lines) == 1 and str(bad) in lines[0] and needle in lines[0], err


def test_config_loaders_name_the_file(tmp_path):
    from moshi_ttt.train.config import TrainConfig
    from moshi_ttt.ttt.config import TTTModelConfig, load_lm_and_ttt

    (tmp_path / "a.json").write_text("{nope")
    (tmp_path / "b.yaml").write_bytes(b"ttt: \xe9\n")
    (tmp_path / "c.yaml").write_text("ttt: [unclosed\n")
    for path in ("a.json", "b.yaml", "c.yaml"):
        for load in (TTTModelConfig.load, load_lm_and_ttt, TrainConfig.load):
            with pytest.raises(ValueError) as e:
                load(tmp_path / path)
            assert str(e.value).startswith(str(tmp_path / path)) and "\n" not in str(e.value), (load, e.value)


@pytest.mark.slow
def test_infer_checks_its_output_before_running(tmp_path):
    from moshi_ttt.testing.speech import espeak_wav

    espeak_wav(tmp_path / "in.wav", "hello there")
    (tmp_path / "outdir").mkdir()
    (tmp_path / "afile").write_text("x")
    for out, needle in (("outdir", "is a directory"), ("afile/out.wav", "is a file, not a folder")):
        t = time.monotonic()
        code, lines, err = run_cli(["infer", "--demo", "in.wav", out], tmp_path)
        assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
        assert not (tmp_path / "outdir.txt").exists()
        assert time.monotonic() - t < 60

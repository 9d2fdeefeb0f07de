"""Measures what a hostile client does to a good one: `moshi-ttt serve --demo` in a subprocess, one good
client streaming real speech at 1×, one attacker process. Prints one JSON line per run.

    python scripts/abuse_probe.py --attack flood --seconds 20 -- --gil-switch-ms 5

Attacks: none; flood (1-byte websocket messages as fast as the socket drains, reconnecting when cut);
pings (websocket PING frames, same); pipelined (100k `GET /health` on one connection, repeated).
Figures: the good client's received audio / wall time, its largest gap between audio messages, the
server's mean step time (from /metrics) and how many times the attacker was disconnected.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/support, from a checkout

from support.launcher import ServeProcess  # noqa: E402


def step_stats(url: str) -> tuple[float, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    s = float(re.search(r"^moshi_ttt_step_seconds_sum (\S+)", text, re.M).group(1))
    n = float(re.search(r"^moshi_ttt_step_seconds_count (\S+)", text, re.M).group(1))
    return s, n


# -- attacker (own process: its CPU must not share the good client's GIL) --------------------------------


async def _flood(ws_url: str, stop_at: float, ping: bool) -> int:
    cuts = 0
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < stop_at:
            try:
                ws = await http.ws_connect(ws_url, autoping=False)
                while time.monotonic() < stop_at and not ws.closed:
                    for _ in range(100):
                        if ping:
                            await ws.ping(b"x")
                        else:
                            await ws.send_bytes(b"\x06")
                    await asyncio.sleep(0)
                cuts += 1
            except (aiohttp.ClientError, ConnectionError, RuntimeError):
                cuts += 1
                await asyncio.sleep(0.01)
    return cuts


async def _pipelined(host: str, port: int, stop_at: float, n: int = 100_000) -> int:
    req = f"GET /health HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    rounds = 0
    while time.monotonic() < stop_at:
        try:
            r, w = await asyncio.open_connection(host, port)
            w.write(req * n)
            await asyncio.wait_for(w.drain(), 10)
            await asyncio.wait_for(r.read(), 10)
            w.close()
        except (ConnectionError, asyncio.TimeoutError, OSError):
            pass
        rounds += 1
    return rounds


def attacker(kind: str, url: str, seconds: float, out) -> None:
    stop_at = time.monotonic() + seconds
    ws_url = url.replace("http://", "ws://") + "/api/chat"
    if kind in ("flood", "pings"):
        out.put(asyncio.run(_flood(ws_url, stop_at, ping=kind == "pings")))
    elif kind == "pipelined":
        host, port = url.split("//")[1].rsplit(":", 1)
        out.put(asyncio.run(_pipelined(host, int(port), stop_at)))
    else:
        out.put(0)


# -- good client ------------------------------------------------------------------------------------------


async def good_client(url: str, pcm, seconds: float) -> dict:
    from moshi_ttt.server.web.client import FRAME, ChatClient

    ws_url = url.replace("http://", "ws://") + "/api/chat"
    async with aiohttp.ClientSession() as http:
        c = await ChatClient.connect(http, ws_url)
        t0 = time.monotonic()
        sent = 0
        while time.monotonic() - t0 < seconds:
            n = len(pcm) // FRAME * FRAME
            sent += await c.send_pcm(pcm[:n], realtime=1.0)
        elapsed = time.monotonic() - t0
        times = [t for t, _ in c.audio_times]
        first = c.first_audio_at or time.monotonic()
        gaps = [b - a for a, b in zip([first, *times], times)] or [elapsed]
        got = c.n_samples / c.sample_rate
        errors = list(c.errors)
        await c.close()
    return {"received_rt": round(got / (elapsed - (first - t0)), 3), "max_gap_s": round(max(gaps), 3),
            "errors": errors, "sent_frames": sent}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--attack", default="none", choices=["none", "flood", "pings", "pipelined"])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("server_args", nargs="*", help="extra `serve` flags (after --)")
    args = p.parse_args()
    from moshi_ttt.testing.speech import espeak_pcm

    pcm = espeak_pcm("Hello there, this is a test of test time training inside Moshi. "
                     "The weather is nice and the sun is out, so we talk for a while.")
    with tempfile.TemporaryDirectory() as d:
        with ServeProcess(d, ["--max-conversations", "2", "--idle-timeout", "30", "--log-level", "error",
                              *args.server_args], omp_threads=1) as srv:
            url = srv.url
            s0, n0 = step_stats(url)
            q = mp.get_context("spawn").Queue()
            atk = mp.get_context("spawn").Process(target=attacker, args=(args.attack, url, args.seconds, q))
            atk.start()
            time.sleep(0.5)
            res = asyncio.run(good_client(url, pcm, args.seconds))
            atk.join(args.seconds + 30)
            cuts = q.get(timeout=5) if not atk.is_alive() else None
            s1, n1 = step_stats(url)
    res.update({"attack": args.attack, "server_args": args.server_args, "attacker_rounds": cuts,
                "mean_step_ms": round(1000 * (s1 - s0) / max(1, n1 - n0), 1), "steps": int(n1 - n0)})
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

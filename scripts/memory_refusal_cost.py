"""Refused-resume cost through the server (websocket upgrade to close): an unknown id against a wrong key of a
stored 256 MiB memory, with the refusal floor (default) and without it, and the bytes the store read per refusal.
Prints the rows of docs/memory.md's table "Refused resumes: what they cost".

    python scripts/memory_refusal_cost.py [-n 150]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time

import aiohttp
from moshi_ttt.server.serve import BackgroundServer
from moshi_ttt.server.web.app import CONFIG

from moshi_ttt.memory.seal import Token
from moshi_ttt.memory.store import MemoryStore


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=150, help="refusals per row (default 150)")
    n = p.parse_args().n
    d = tempfile.mkdtemp()
    tok = Token.new()
    MemoryStore(f"{d}/store").save(tok, "fp", os.urandom(256 << 20), {"frames": 1, "chunks": 1,
                                                                      "compression": "exact"}, owner="x", expect=None)
    srv = BackgroundServer(["--demo", "--port", "0", "--cache-dir", f"{d}/cache", "--memory-store", f"{d}/store",
                            "--no-per-ip-limits", "--log-level", "error"])
    cfg = srv.server.runner.app[CONFIG]
    store = cfg.memories.store

    async def once(http: aiohttp.ClientSession, text: str) -> float:
        t0 = time.perf_counter()
        ws = await http.ws_connect(srv.ws_url, params={"resume": text})
        async for _ in ws:
            pass
        return time.perf_counter() - t0

    async def go() -> None:
        async with aiohttp.ClientSession() as http:
            for floor in (cfg.session.memory_refusal_floor, 0.0):
                cfg.session.memory_refusal_floor = floor
                for name, make in (("unknown id", lambda: str(Token.new())),
                                   ("wrong key", lambda: str(Token(tok.id, Token.new().key)))):
                    b0 = store.bytes_read
                    ts = sorted([await once(http, make()) for _ in range(n)])
                    print(f"| floor {floor:g} s | {name} | {statistics.median(ts) * 1e3:.2f} ms | "
                          f"{ts[int(0.9 * n)] * 1e3:.2f} ms | {(store.bytes_read - b0) / n:.0f} |", flush=True)

    try:
        asyncio.run(go())
    finally:
        srv.stop()


if __name__ == "__main__":
    main()

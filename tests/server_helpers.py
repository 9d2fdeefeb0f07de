"""Small helpers shared by the server tests (a background `BackgroundServer` as `srv`)."""

import asyncio
import json
import urllib.request


def health(srv) -> dict:
    with urllib.request.urlopen(srv.url + "/health", timeout=5) as r:
        return json.loads(r.read())


async def wait_active(srv, n: int, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if srv.engine.active_count() == n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"expected {n} active conversations, have {srv.engine.active_count()}")

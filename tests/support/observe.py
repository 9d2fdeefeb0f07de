"""What a running server reports, for tests and benchmarks: its /health JSON, its /metrics parsed by
prometheus_client's own parser, and waits until its conversation slots are in a given state."""

from __future__ import annotations

import asyncio
import json
import typing as tp
import urllib.request


def health(srv_or_url: tp.Any) -> dict:
    """The /health JSON of a server (anything with `.url`: ServeProcess, BackgroundServer) or a base URL."""
    url = srv_or_url if isinstance(srv_or_url, str) else srv_or_url.url
    with urllib.request.urlopen(url + "/health", timeout=5) as r:
        return json.loads(r.read())


def parse_prometheus(text: str) -> dict:
    """`/metrics` text → {sample name: [(labels, value)]}, parsed by prometheus_client's own parser (which
    raises on malformed input); each family's type is under the key ("TYPE", family name)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict = {}
    for fam in text_string_to_metric_families(text):
        out[("TYPE", fam.name)] = fam.type
        for smp in fam.samples:
            out.setdefault(smp.name, []).append((dict(smp.labels), smp.value))
    return out


async def wait_active(srv: tp.Any, n: int, timeout: float = 5.0) -> None:
    """Until exactly n conversations of an in-process server (`BackgroundServer`) hold a slot."""
    for _ in range(int(timeout / 0.05)):
        if srv.engine.active_count() == n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"expected {n} active conversations, have {srv.engine.active_count()}")


async def wait_http_free(http: tp.Any, url: str, timeout: float = 10.0) -> None:
    """Until /health (asked through the aiohttp session `http`) reports no active conversation."""
    for _ in range(int(timeout / 0.05)):
        async with http.get(url + "/health") as r:
            if (await r.json())["active"] == 0:
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{url}: a conversation slot is still taken after {timeout:g} s")

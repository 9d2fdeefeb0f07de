"""Acceptance of issue 21 (no client can degrade another), measured: a good client streams 20 s of real
speech at 1× to `serve --demo --max-conversations 4` (defaults: the model worker process, per-address
limits) while attackers in their own process (`support.attackers`) do (a) three
reconnect-flooders from one address, (b) twenty from 127.0.0.2–127.0.0.21, (c) a client sending valid
audio at 3× real time, (d) the hostile cases of test_server_abuse (message and ping floods, pipelining,
huge headers, slowloris) all at once. The good client must receive ≥ 0.95× real time with every gap
< 0.5 s. The figures are printed (`pytest -s`); a baseline without attackers runs first: if even it
misses the bar, the machine is too loaded to judge and the test is skipped with its figures.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import urllib.request

import aiohttp
import numpy as np
import pytest
from moshi_ttt.server.web.client import ChatClient

from support.attackers import Attack
from support.launcher import ServeProcess

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]  # attackers in their own process, ~2-3 min

SECONDS = 20.0
MIN_REAL_TIME = 0.95
MAX_GAP = 0.5
SCENARIOS = {
    "a: 3 reconnect-flooders, one address": [("reconnect", "127.0.0.2")] * 3,
    "b: 20 reconnect-flooders, 20 addresses": [("reconnect", f"127.0.0.{k}") for k in range(2, 22)],
    # fresh addresses: the flooders of (a) and (b) are banned for a while, which is not what (c), (d) test
    "c: valid audio at 3x": [("audio3x", "127.0.0.30")],
    "d: floods, pings, pipelining, headers, slowloris": [("reconnect", "127.0.0.31"), ("pings", "127.0.0.32"),
                                                          ("pipelining", "127.0.0.33"), ("headers", "127.0.0.34"),
                                                          ("slowloris", "127.0.0.35")],
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("isolation_server")
    with ServeProcess(d, ["--max-conversations", "4", "--idle-timeout", "30", "--log-level", "warning"],
                      host="127.0.0.1") as srv:
        yield srv
    assert srv.returncode == 0, srv.log_tail()


def step_ms(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    s = float(re.search(r"^moshi_ttt_step_seconds_sum (\S+)", text, re.M).group(1))
    n = float(re.search(r"^moshi_ttt_step_seconds_count (\S+)", text, re.M).group(1))
    return 1000 * s / max(n, 1)


def good_run(url: str, pcm: np.ndarray, plan) -> dict:
    """Streams `pcm` at 1× from 127.0.0.1 while `plan` attacks; figures over the stream after its first
    output frames."""
    ws_url = url.replace("http://", "ws://") + "/api/chat"

    async def go():
        async with aiohttp.ClientSession() as http:
            c = await ChatClient.connect(http, ws_url)
            await c.send_pcm(pcm[: 2 * 1920], realtime=1.0)
            await c.wait_output_frames(1, timeout=20)
            t_from = time.monotonic()
            await c.send_pcm(pcm[2 * 1920:], realtime=1.0)
            t_to = time.monotonic()
            errors = list(c.errors)
            await c.close()
            return c, t_from, t_to, errors

    step0 = step_ms(url)
    load0 = os.getloadavg()[0]
    if plan:
        with Attack(url, plan, SECONDS + 3, pcm=pcm[: 5 * 24000]) as attack:
            c, t_from, t_to, errors = asyncio.run(go())
        counts = attack.counts
    else:
        c, t_from, t_to, errors = asyncio.run(go())
        counts = []
    pts = [(t, n) for t, n in c.audio_times if t_from <= t <= t_to]
    before = max((n for t, n in c.audio_times if t < t_from), default=0)
    received = ((pts[-1][1] - before) / 24000) if pts else 0.0
    times = [t_from] + [t for t, _ in pts] + [t_to]
    gap = max(b - a for a, b in zip(times, times[1:]))
    return {"real_time": received / (t_to - t_from), "max_gap_s": gap, "errors": errors, "load": load0,
            "step_ms_before": step0, "step_ms_after": step_ms(url),
            "attackers": _summary(counts)}


def _summary(counts: list[dict]) -> dict:
    out: dict = {}
    for c in counts:
        agg = out.setdefault(c["kind"], {})
        for k, v in c.items():
            if k not in ("kind", "source"):
                agg[k] = agg.get(k, 0) + v
    return out


def test_no_client_degrades_the_good_one(server, server_speech):
    url = server.url
    base = server_speech["a"]
    pcm = np.tile(base, int(np.ceil(SECONDS * 24000 / base.size)))[: int(SECONDS * 24000)]
    figures = {"baseline": good_run(url, pcm, [])}
    print(f"\nbaseline: {figures['baseline']}")
    b = figures["baseline"]
    if b["real_time"] < MIN_REAL_TIME or b["max_gap_s"] >= MAX_GAP:
        pytest.skip(f"the machine is too loaded to judge: without any attacker the good client gets "
                    f"{b['real_time']:.3f}× real time, largest gap {b['max_gap_s']:.2f} s (load {b['load']:.1f})")
    for name, plan in SCENARIOS.items():
        figures[name] = good_run(url, pcm, plan)
        print(f"{name}: {figures[name]}")
        time.sleep(1.0)
    bad = {k: (round(v["real_time"], 3), round(v["max_gap_s"], 2)) for k, v in figures.items()
           if v["real_time"] < MIN_REAL_TIME or v["max_gap_s"] >= MAX_GAP or v["errors"]}
    assert not bad, f"good client below {MIN_REAL_TIME}× real time or with a gap >= {MAX_GAP} s: {bad}; {figures}"

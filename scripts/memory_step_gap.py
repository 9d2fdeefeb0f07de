"""Does saving and resuming conversations disturb the others? At demo scale (`serve --demo`, 4 slots).

One conversation ("runner") streams at real time for `--seconds`; meanwhile `--others` conversations go
round in cycles of `--cycle` seconds of real-time audio: with memory (`?memory=1`, then `?resume=` the
token of the previous cycle; a checkpoint every chunk, a final save at each end, a restore at each start),
or, for the baseline, plain conversations doing the same. The runner's gaps between consecutive reply
audio messages (client side: includes Opus and the websocket) are the step gaps it feels. Prints JSON and
writes it to `--out`.

    .venv/bin/python scripts/memory_step_gap.py --out docs/memory_step_gap.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
from moshi_ttt.server.web.client import FRAME, ChatClient

from moshi_ttt.utils import provenance

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/support, from a checkout

from support.launcher import ServeProcess  # noqa: E402
from support.observe import parse_prometheus  # noqa: E402

SR = 24000


def _pcm(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    return (0.2 * np.sin(2 * np.pi * (180 + 40 * seed) * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


async def _other(http, url: str, k: int, stop: asyncio.Event, memory: bool, cycle: float, counts: dict) -> None:
    token = None
    while not stop.is_set():
        c = await ChatClient.connect(http, url, memory=memory and token is None, resume=token if memory else None)
        if memory:
            await c.wait_for(lambda c=c: c.memory() is not None, 10, "memory message")
            token = c.memory()["token"]
            counts["resumes" if c.memory().get("resumed") else "new"] += 1
        n = await c.send_pcm(_pcm(cycle, 10 + k), realtime=1.0)
        await c.wait_output_frames(n, timeout=30)
        await c.close()
        counts["cycles"] += 1
        await asyncio.sleep(0.3)  # the final save (the slot is free once it is done)


async def _phase(url: str, seconds: float, others: int, memory: bool, cycle: float) -> dict:
    async with aiohttp.ClientSession() as http:
        runner = await ChatClient.connect(http, url)
        stop, counts = asyncio.Event(), {"cycles": 0, "new": 0, "resumes": 0}
        tasks = [asyncio.create_task(_other(http, url, k, stop, memory, cycle, counts)) for k in range(others)]
        await asyncio.sleep(1.0)
        t0 = time.monotonic()
        n = await runner.send_pcm(_pcm(seconds, 0), realtime=1.0)
        await runner.wait_output_frames(n, timeout=60)
        stop.set()
        await asyncio.gather(*tasks)
        await runner.close()
        times = np.array([t for t, _ in runner.audio_times if t >= t0 + 1.0])  # skip the acoustic delay
        gaps = np.diff(times) * 1000
        return {"memory": memory, "runner_frames": n, "gap_ms_max": round(float(gaps.max()), 1),
                "gap_ms_p99": round(float(np.percentile(gaps, 99)), 1),
                "gap_ms_median": round(float(np.median(gaps)), 1), **counts}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--others", type=int, default=3)
    p.add_argument("--cycle", type=float, default=3.0, help="seconds of audio per cycle of the other conversations")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    start = provenance.started()
    with tempfile.TemporaryDirectory() as d:
        args = ["--max-conversations", str(a.others + 1), "--memory-store", f"{d}/store", "--memory-save-every", "1",
                "--no-per-ip-limits", "--idle-timeout", "30", "--ttt-config", "configs/demo_ttt.yaml",
                "--log-level", "warning"]
        with ServeProcess(d, args) as srv:
            phases = [asyncio.run(_phase(srv.ws_url, a.seconds, a.others, m, a.cycle)) for m in (False, True)]
            import urllib.request
            with urllib.request.urlopen(srv.url + "/metrics") as r:
                fams = parse_prometheus(r.read().decode())
    hist = {}
    for name in ("memory_save_seconds", "memory_restore_seconds", "memory_step_pause_seconds"):
        count, total = fams[f"moshi_ttt_{name}_count"][0][1], fams[f"moshi_ttt_{name}_sum"][0][1]
        hist[name.replace("seconds", "ms_mean")] = round(1000 * total / max(count, 1), 2)
        hist[name.replace("_seconds", "s")] = int(count)
    pauses = {lb["le"]: v for lb, v in fams["moshi_ttt_memory_step_pause_seconds_bucket"]}
    hist["memory_step_pause_ms_bound_all"] = next(1000 * float(le) for le, v in pauses.items()
                                                  if v == pauses["+Inf"])  # the smallest bucket holding them all
    out = {"setup": {"model": "serve --demo (configs/demo_ttt.yaml: 2 TTT layers d 64 h 176, chunk 16)",
                     "slots": a.others + 1, "seconds": a.seconds, "cycle_s": a.cycle, "checkpoint_every_chunks": 1,
                     "frame_ms": 1000 * FRAME / SR},
           "baseline": phases[0], "with_memory": phases[1], **hist}
    out = provenance.finished(out, start)
    text = json.dumps(out, indent=1)
    print(text)
    if a.out is not None:
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

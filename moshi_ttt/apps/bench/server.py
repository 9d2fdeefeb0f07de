"""The `server` section of `moshi-ttt bench`: the realtime speed of `moshi-ttt serve --demo`, and (with
`profile=True`) where a step's time goes.

Arrangement: the server runs in this process exactly as `serve` runs it (`BackgroundServer`: the
event-loop thread here, the model in its worker process; with `profile`, `--workers 0`: the engine
thread here too, where the sampler sees it); the clients run in a *spawned child process*, each streaming real speech
(`moshi_ttt.testing.speech`) as Ogg Opus at 1× real time and decoding the reply, so they never compete with
the server for its GIL. This process only waits while they run.

`server_realtime_speed_n` = audio seconds / wall seconds of each of n conversations = frame duration / mean
batched step time over their run (`Engine` counts steps and their compute seconds); ≥ 1 means every
conversation keeps up. `server_rtf_n` is the same value under a second key (an alias: docs/serving.md).
`server_step_ms_n` is that mean step, `server_step_cpu_ms_n` the engine thread's CPU time per step (less
sensitive to other processes on a shared machine than wall time), `server_rows_per_step_n` how many
conversations a step served on average (batching), `server_transport_{in,out}_ms` the mean time of one PCM
frame through the shared-memory rings to the model worker and back (written → read; the latency the process
split adds).

Profile: a sampler thread reads the engine and event-loop threads' Python stacks every
`PROFILE_INTERVAL` s (`sys._current_frames`, no change to the served code) and files each sample
under the innermost known stage (`ENGINE_STAGES`, `LOOP_STAGES`); a stage's share of samples times
the wall time, divided by the steps, is its milliseconds per step. Opus runs in C, so its samples are
the session line that calls it.
"""

from __future__ import annotations

import asyncio
import collections
import linecache
import multiprocessing
import sys
import threading
import time
import typing as tp

import numpy as np

from moshi_ttt.models.streams import FRAME, SAMPLE_RATE

PROFILE_INTERVAL = 0.002

# (stage, file name ending, function name[, source text on the sampled line]); first match from the
# innermost frame outwards wins, so nested stages (depformer inside the LM step) come first.
ENGINE_STAGES: list[tuple[str, str, str, str | None]] = [
    ("LM depformer (one step per codebook)", "moshi/models/lm.py", "depformer_step", None),
    ("LM forward_text (main transformer)", "", "forward_text", None),
    ("TTT telemetry read", "server/step/engine.py", "_telemetry_rows", None),
    ("TTT telemetry read", "server/step/engine.py", "_periodic_telemetry", None),
    ("slot reset", "server/step/engine.py", "_command", None),
    ("Mimi encode", "moshi/models/compression.py", "encode", None),
    ("Mimi decode", "moshi/models/compression.py", "decode", None),
    ("LM step other (sampling text, token cache)", "moshi/models/lm.py", "_step", None),
    ("step: batch assembly, host copies, emit", "server/step/engine.py", "_step", None),
    ("step: batch assembly, host copies, emit", "server/step/engine.py", "compute", None),
    ("idle: waiting for frames", "server/step/engine.py", "_select", None),
    ("idle: waiting for frames", "server/step/engine.py", "_loop", None),
]
LOOP_STAGES: list[tuple[str, str, str, str | None]] = [
    ("Opus encode (reply)", "server/web/session.py", "_send", "append_pcm"),
    ("Opus decode (input)", "server/web/session.py", "_recv", "append_bytes"),
    ("idle: epoll wait", "selectors.py", "select", None),
    ("websocket, session, aiohttp", "", "", None),
]


def speech(quick: bool) -> np.ndarray:
    from moshi_ttt.testing.speech import SpeechUnavailable, espeak_pcm

    text = "Hello there, this is a test of test time training inside Moshi." + (
        "" if quick else " The weather is nice and the sun is out. Tell me a story about a cat and a dog.")
    try:
        return espeak_pcm(text)
    except SpeechUnavailable as e:
        raise SystemExit(f"moshi-ttt bench: the server section needs real speech: {e}") from None


# -- clients (child process) ---------------------------------------------------------------------------


async def _conversations(ws_url: str, pcm: np.ndarray, n: int, timeout: float) -> None:
    import aiohttp

    from moshi_ttt.server.web.client import ChatClient

    frames = -(-pcm.size // FRAME)
    async with aiohttp.ClientSession() as http:
        clients = [await ChatClient.connect(http, ws_url) for _ in range(n)]
        await asyncio.gather(*(c.send_pcm(pcm, realtime=1.0) for c in clients))
        await asyncio.gather(*(c.wait_output_frames(frames, timeout=timeout) for c in clients))
        for c in clients:
            await c.close()


def _clients_main(ws_url: str, pcm: np.ndarray, n: int, timeout: float, errors) -> None:
    try:
        asyncio.run(_conversations(ws_url, pcm, n, timeout))
    except BaseException as e:  # reported to the parent, which fails the bench
        errors.put(f"{type(e).__name__}: {e}")


def run_clients(ws_url: str, pcm: np.ndarray, n: int, timeout: float = 120.0) -> None:
    """`n` concurrent conversations from a spawned process, each streaming `pcm` at 1× and waiting for
    its whole reply. Raises RuntimeError with the child's error if any conversation failed."""
    ctx = multiprocessing.get_context("spawn")
    errors = ctx.Queue()
    proc = ctx.Process(target=_clients_main, args=(ws_url, pcm, n, timeout, errors), name=f"bench-clients-{n}")
    proc.start()
    proc.join(timeout + 60)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise RuntimeError(f"bench clients ({n}) did not finish within {timeout + 60:.0f} s")
    if not errors.empty() or proc.exitcode != 0:
        detail = errors.get() if not errors.empty() else f"exit code {proc.exitcode}"
        raise RuntimeError(f"bench clients ({n} conversations) failed: {detail}")


# -- profile -------------------------------------------------------------------------------------------


def _classify(frame, stages: list[tuple[str, str, str, str | None]]) -> str:
    f = frame
    while f is not None:
        code = f.f_code
        name = code.co_filename.replace("\\", "/")
        for stage, file_end, func, text in stages:
            if not func:
                continue
            if code.co_name == func and name.endswith(file_end):
                if text is None or text in linecache.getline(code.co_filename, f.f_lineno):
                    return stage
        f = f.f_back
    return stages[-1][0] if not stages[-1][2] else "other"


class StackSampler:
    """Samples the given threads' Python stacks every `interval` s on a daemon thread; `counts[thread
    label][stage]` is the number of samples per stage."""

    def __init__(self, threads: dict[str, tuple[int, list]], interval: float = PROFILE_INTERVAL):
        self.threads = threads
        self.interval = interval
        self.counts: dict[str, collections.Counter] = {k: collections.Counter() for k in threads}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def __enter__(self) -> StackSampler:
        self.t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.seconds = time.perf_counter() - self.t0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            frames = sys._current_frames()
            for label, (ident, stages) in self.threads.items():
                frame = frames.get(ident)
                if frame is not None:
                    self.counts[label][_classify(frame, stages)] += 1


def profile_table(prof: dict[int, dict[str, dict[str, float]]]) -> str:
    """Markdown table from `bench_server(profile=True)["server_profile"]`: ms per step by stage."""
    cols = sorted(prof)
    out = ["| thread: stage | " + " | ".join(f"{n} client{'s' if n > 1 else ''} (ms/step)" for n in cols) + " |",
           "|---|" + "---|" * len(cols)]
    for thread in ("engine", "loop"):
        stages: list[str] = []
        for n in cols:
            stages += [s for s in prof[n][thread] if s not in stages]
        for s in stages:
            out.append(f"| {thread}: {s} | " + " | ".join(f"{prof[n][thread].get(s, 0.0):.1f}" for n in cols) + " |")
    return "\n".join(out)


# -- the section -----------------------------------------------------------------------------------------


def _session(srv, pcm: np.ndarray, n: int, sampler: StackSampler | None = None) -> dict[str, float]:
    eng = srv.engine
    steps0, wall0, cpu0, rows0 = eng.steps, eng.step_seconds, eng.step_cpu_seconds, eng.rows_stepped
    if sampler is None:
        run_clients(srv.ws_url, pcm, n)
    else:
        with sampler:
            run_clients(srv.ws_url, pcm, n)
    time.sleep(0.3)  # the model worker reports its step counters every 0.1 s
    steps = eng.steps - steps0
    if steps <= 0:
        raise RuntimeError(f"the engine made no step for {n} conversations")
    step = (eng.step_seconds - wall0) / steps
    return {"steps": steps, "step_s": step, "cpu_s": (eng.step_cpu_seconds - cpu0) / steps,
            "rows": (eng.rows_stepped - rows0) / steps}


def bench_server(quick: bool, profile: bool = False) -> dict:
    """`server_realtime_speed_{1,4}` and the rest of the server section (see the module doc). With `profile`, one
    more run per client count under the stack sampler: `server_profile` = {n: {thread: {stage: ms per
    step}}} and `server_profile_table` (markdown)."""
    from moshi_ttt.server.serve import BackgroundServer

    pcm = speech(quick)
    # the profile samples the engine thread's stacks: that needs the model in this process (--workers 0)
    srv = BackgroundServer(["--demo", "--port", "0", "--max-conversations", "4", "--log-level", "warning",
                            "--no-per-ip-limits", "--idle-timeout", "30", "--workers", "0" if profile else "1"])
    res: dict[str, tp.Any] = {"server_clip_seconds": pcm.size / SAMPLE_RATE}  # espeak_pcm's rate
    try:
        fs = srv.engine.frame_seconds
        for n in (1, 4):
            r = _session(srv, pcm, n)
            res[f"server_realtime_speed_{n}"] = res[f"server_rtf_{n}"] = fs / r["step_s"]
            res[f"server_step_ms_{n}"] = 1000 * r["step_s"]
            res[f"server_step_cpu_ms_{n}"] = 1000 * r["cpu_s"]
            res[f"server_rows_per_step_{n}"] = r["rows"]
        reg = srv.server.metrics.registry
        for d in ("in", "out"):  # the model worker's shared-memory transport, one frame, mean over the runs
            count = reg.get_sample_value("moshi_ttt_worker_transport_seconds_count", {"direction": d}) or 0
            if count:
                total = reg.get_sample_value("moshi_ttt_worker_transport_seconds_sum", {"direction": d})
                res[f"server_transport_{d}_ms"] = 1000 * total / count
        if profile:
            prof: dict[int, dict[str, dict[str, float]]] = {}
            for n in (1, 4):
                sampler = StackSampler({"engine": (srv.engine.thread_ident, ENGINE_STAGES),
                                        "loop": (srv.thread_ident, LOOP_STAGES)})
                r = _session(srv, pcm, n, sampler)
                prof[n] = {}
                for thread, counts in sampler.counts.items():
                    total = sum(counts.values()) or 1
                    prof[n][thread] = {s: 1000 * sampler.seconds * c / total / r["steps"]
                                       for s, c in counts.most_common()}
                prof[n]["engine"]["(measured step, profiled run)"] = 1000 * r["step_s"]
            res["server_profile"] = prof
            res["server_profile_table"] = profile_table(prof)
    finally:
        srv.stop()
    return res

"""The web process's handle on the model worker process (`worker`): the `Engine` interface the sessions
use (claim / push / release, queued frames, the slot count), backed by the shared-memory rings and the
control pipe, and the worker's supervisor.

The web process allocates the slots, so admission never waits for the worker; a claim sends
("claim", slot, conv) and the worker answers "ready" once the row is reset. Output frames are read
from the rings on the event loop (a reader on the wake pipe) and handed to each conversation's sink
in order; control events for a slot are delivered only after its ring is drained.

Fault isolation: the worker's sentinel is a reader on the event loop, so a dead worker is noticed at
once. Every live conversation then gets an error event `Reason.WORKER_RESTARTED`, every slot is freed, `alive`
is False (/health 503) and a new worker is spawned after a backoff that doubles while workers die young
(`RESTART_BACKOFF_S` up to `RESTART_BACKOFF_MAX_S`). Must be used from one event loop thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import multiprocessing
import os
import time
import typing as tp
from dataclasses import dataclass, field

from ..core.config import ServeConfig
from ..core.engine_api import Done
from ..core.events import EngineClosed, Event, EventKind, Sink
from ..core.reasons import WORKER_RESTARTING, Reason
from ..metrics import Metrics
from . import bulk, messages
from .shm_ring import Rings
from .worker import USER_ERRORS, MetricsRelay, worker_main

log = logging.getLogger("moshi_ttt.server.remote")

RESTART_BACKOFF_S = 0.5
RESTART_BACKOFF_MAX_S = 30.0
STABLE_S = 60.0  # a worker that lived this long resets the backoff
RING_SLACK = 64  # input ring frames beyond the conversation's backlog limit (one client message)
OUT_RING_FRAMES = 256  # output frames a slot's ring holds (20 s) while the event loop is busy


@dataclass
class RemoteSlot:
    index: int
    conv_id: int | None = None
    sink: Sink | None = None
    ready: bool = False
    pushed: collections.deque = field(default_factory=collections.deque)  # t_push of frames not answered yet


class _Proc:
    """One spawned worker and its pipes."""

    def __init__(self, ctx, cfg: ServeConfig):
        self.ctrl, child_ctrl = ctx.Pipe(duplex=True)
        in_r, self.wake_in = ctx.Pipe(duplex=False)
        self.wake_out, out_w = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=worker_main, args=(cfg, child_ctrl, in_r, out_w),
                                   name="moshi-ttt-model-worker", daemon=True)
        self.process.start()
        for c in (child_ctrl, in_r, out_w):
            c.close()
        os.set_blocking(self.wake_in.fileno(), False)
        os.set_blocking(self.wake_out.fileno(), False)
        self.started_at = time.monotonic()
        self.rings: Rings | None = None

    def close(self) -> None:
        for c in (self.ctrl, self.wake_in, self.wake_out):
            with contextlib.suppress(OSError):
                c.close()
        if self.rings is not None:
            self.rings.close()
            self.rings = None


class WorkerEngine:
    """See the module doc. `cfg`: the server's config (pickled to the worker)."""

    def __init__(self, cfg: ServeConfig, start_timeout: float = 300.0):
        self.cfg = cfg
        self.n = cfg.max_conversations
        self.start_timeout = start_timeout
        self.slots = [RemoteSlot(i) for i in range(self.n)]
        self.metrics: Metrics | None = None
        self.info: dict = {}
        self.frame_size = 0
        self.sample_rate = 0
        self.frame_seconds = 0.0
        self.pieces: list[str | None] = []
        self.steps = 0
        self.step_seconds = 0.0
        self.step_cpu_seconds = 0.0
        self.rows_stepped = 0
        self.restarts = 0
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: _Proc | None = None
        self._serving = False
        self._closing = False
        self._next_conv = 1
        self._started: asyncio.Future | None = None
        self._restart_task: asyncio.Task | None = None
        self._failures = 0
        self._fatal: BaseException | None = None  # why the worker being started failed
        self._stats_base = (0, 0.0, 0.0, 0)  # counters of the workers that died (the totals keep growing)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.memory_fingerprint: str | None = None
        self._next_req = 1
        self._pending: dict[int, tp.Callable[[bool, tp.Any], None]] = {}  # memory requests awaiting their reply
        self._bulk: bulk.Channel | None = None  # memory bytes to and from the worker, sealed (`bulk`)
        self._tasks: set[asyncio.Task] = set()

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Spawns the worker and returns once it serves (model loaded, warm, rings attached). If it does not, the
        engine is closed (the worker stopped, the bulk directory removed) before the error is raised. First removes
        the bulk directories of killed servers (`bulk.sweep`)."""
        self._loop = asyncio.get_running_loop()
        for stale in await asyncio.to_thread(bulk.sweep):
            log.warning("removed %s, left by a server that was killed", stale)
        self._bulk = bulk.Channel.new(bulk.private_dir())
        try:
            await self._spawn()
        except BaseException:
            await self.close()
            raise

    async def _spawn(self) -> None:
        loop = self._loop
        self._started = loop.create_future()
        proc = await asyncio.to_thread(_Proc, self._ctx, self.cfg)
        self._proc = proc
        loop.add_reader(proc.ctrl.fileno(), self._on_ctrl, proc)
        loop.add_reader(proc.process.sentinel, self._on_exit, proc)
        try:
            info = await asyncio.wait_for(asyncio.shield(self._started), self.start_timeout)
        except asyncio.TimeoutError:
            proc.process.kill()
            raise RuntimeError(f"model worker did not start within {self.start_timeout:.0f} s") from None
        self.info = {k: v for k, v in info.items()
                     if k not in ("pieces", "frame_size", "frame_seconds", "memory_fingerprint")}
        self.memory_fingerprint = info.get("memory_fingerprint")
        self.frame_size, self.sample_rate = int(info["frame_size"]), int(info["sample_rate"])
        self.frame_seconds, self.pieces = float(info["frame_seconds"]), list(info["pieces"])
        if self.metrics is None:
            self.metrics = Metrics(max_conversations=self.n, frame_seconds=self.frame_seconds)
            self.metrics.set_ttt_layers(info.get("ttt_layers", []))
        max_backlog = max(1, round(self.cfg.max_delay / self.frame_seconds))
        proc.rings = Rings(self.n, self.frame_size, max_backlog + RING_SLACK, OUT_RING_FRAMES)
        proc.ctrl.send(messages.Attach(proc.rings.spec(), self._bulk))
        loop.add_reader(proc.wake_out.fileno(), self._on_output, proc)
        self._serving = True
        log.info("model worker pid %d serving (%d slots)", proc.process.pid, self.n)

    async def close(self, timeout: float = 10.0) -> None:
        """Stops the worker ("stop", then kill after `timeout`), frees the shared memory and removes the bulk
        directory (also when no worker was ever started)."""
        self._closing = True
        self._serving = False
        try:
            await self._stop_worker(timeout)
        finally:
            bulk.remove_dir(self._bulk.directory if self._bulk is not None else None)
            self._bulk = None

    async def _stop_worker(self, timeout: float) -> None:
        if self._restart_task is not None:
            self._restart_task.cancel()
            with contextlib.suppress(BaseException):
                await self._restart_task
        proc = self._proc
        if proc is None:
            return
        self._fail_pending("the engine is stopping")
        with contextlib.suppress(OSError, ValueError):
            proc.ctrl.send(messages.Stop())
        deadline = time.monotonic() + timeout
        while proc.process.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if proc.process.is_alive():
            log.warning("model worker did not stop within %.0f s: killed", timeout)
            proc.process.kill()
            await asyncio.to_thread(proc.process.join, 5)
        self._detach(proc)

    @property
    def alive(self) -> bool:
        return self._serving and self._proc is not None and self._proc.process.is_alive()

    @property
    def pid(self) -> int | None:
        return self._proc.process.pid if self._proc is not None else None

    # -- the Engine interface (event loop thread) --------------------------------------------------

    def claim(self, sink: Sink) -> tuple[RemoteSlot, int] | None:
        if self._closing or not self.alive:
            raise EngineClosed(WORKER_RESTARTING if not self._closing else "the engine is stopping")
        free = next((s for s in self.slots if s.conv_id is None), None)
        if free is None:
            return None
        conv = self._next_conv
        self._next_conv += 1
        try:
            self._proc.ctrl.send(messages.Claim(free.index, conv))
        except (OSError, ValueError):  # it died just now: the sentinel is about to report it
            raise EngineClosed(WORKER_RESTARTING) from None
        free.conv_id, free.sink, free.ready = conv, sink, False
        free.pushed.clear()
        self.metrics.set_active(self.active_count())
        return free, conv

    def push(self, slot: RemoteSlot, conv_id: int, frames: list) -> bool:
        if not frames:
            return True
        if slot.conv_id != conv_id or not self.alive:
            return False
        now = time.monotonic()
        if not self._proc.rings.put_input(slot.index, conv_id, frames, now):
            return False
        slot.pushed.extend([now] * len(frames))
        try:
            os.write(self._proc.wake_in.fileno(), b"\1")
        except BlockingIOError:
            pass
        return True

    def release(self, slot: RemoteSlot, conv_id: int) -> None:
        if slot.conv_id != conv_id:
            return
        slot.conv_id, slot.sink, slot.ready = None, None, False
        slot.pushed.clear()
        if self.alive:
            with contextlib.suppress(OSError, ValueError):
                self._proc.ctrl.send(messages.Release(slot.index, conv_id))
        if self.metrics is not None:
            self.metrics.set_active(self.active_count())

    def save_memory(self, slot: RemoteSlot, conv_id: int, done, final: bool = False) -> None:
        """As `Engine.save_memory`, in the worker; `done` runs on the event loop thread."""
        self._request(lambda req: messages.Snapshot(req, slot.index, conv_id, final), done)

    def restore_memory(self, slot: RemoteSlot, conv_id: int, data: bytes, done) -> None:
        """As `Engine.restore_memory`, in the worker; `done` runs on the event loop thread. The bytes go as a
        sealed file (`bulk`), written on a thread."""
        channel = self._bulk

        async def send() -> None:
            try:
                ref = await asyncio.to_thread(bulk.put, data, channel)
            except OSError as e:
                done(False, f"memory bytes to the model worker: {e}")
                return

            def answered(ok: bool, payload: tp.Any) -> None:
                if not ok:
                    bulk.discard(ref, channel)  # the worker never took it (refused before reading, or gone)
                done(ok, payload)
            self._request(lambda req: messages.Restore(req, slot.index, conv_id, ref), answered)
        self._spawn_task(send())

    def _spawn_task(self, coro) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reply_bulk(self, done, payload: dict) -> None:
        channel = self._bulk
        if channel is None:
            done(False, "the engine is stopping")
            return
        try:
            data = await asyncio.to_thread(bulk.take, payload["data"], channel)
        except OSError as e:
            done(False, f"memory bytes from the model worker: {e}")
            return
        done(True, {**payload, "data": data})

    def _request(self, message: tp.Callable[[int], messages.Snapshot | messages.Restore], done: Done) -> None:
        """Sends `message(req)` with a new request number; `done` gets its Reply."""
        if not self.alive:
            done(False, WORKER_RESTARTING)
            return
        req = self._next_req
        self._next_req += 1
        self._pending[req] = done
        try:
            self._proc.ctrl.send(message(req))
        except (OSError, ValueError):
            self._pending.pop(req, None)
            done(False, WORKER_RESTARTING)

    def _fail_pending(self, why: str) -> None:
        pending, self._pending = self._pending, {}
        for done in pending.values():
            done(False, why)

    def active_count(self) -> int:
        return sum(s.conv_id is not None for s in self.slots)

    def free_count(self) -> int:
        return self.n - self.active_count() if self.alive else 0

    def queued_frames(self, slot: RemoteSlot) -> int:
        return len(slot.pushed)

    def oldest_wait(self) -> float:
        now = time.monotonic()
        return max((now - s.pushed[0] for s in self.slots if s.conv_id is not None and s.pushed), default=0.0)

    # -- from the worker (event loop callbacks) ----------------------------------------------------

    def _on_output(self, proc: _Proc) -> None:
        try:
            os.read(proc.wake_out.fileno(), 65536)
        except BlockingIOError:
            pass
        except OSError:
            return
        self._drain(proc)

    def _drain(self, proc: _Proc) -> None:
        rings = proc.rings
        if rings is None or proc is not self._proc:
            return
        now = time.monotonic()
        for slot in self.slots:
            for conv, frame_no, tid, stamp, pcm in rings.take_output(slot.index):
                if conv != slot.conv_id or slot.sink is None:
                    continue
                if slot.pushed:
                    slot.pushed.popleft()
                self.metrics.observe_transport("out", now - stamp)
                text = self.pieces[tid] if 0 <= tid < len(self.pieces) else None
                slot.sink(Event(EventKind.FRAME, pcm=pcm, text=text, frame=frame_no, text_id=tid))

    def _on_ctrl(self, proc: _Proc) -> None:
        try:
            while proc.ctrl.poll():
                self._message(proc, proc.ctrl.recv())
        except (EOFError, OSError):
            self._loop.remove_reader(proc.ctrl.fileno())  # the sentinel reports the exit

    def _message(self, proc: _Proc, msg: messages.ToWeb) -> None:
        match msg:
            case messages.Started(info):
                if self._started is not None and not self._started.done():
                    self._started.set_result(info)
            case messages.MetricsFlush(calls, stats):
                MetricsRelay.replay(self.metrics, calls)
                s0, w0, c0, r0 = self._stats_base
                self.steps, self.step_seconds = s0 + stats["steps"], w0 + stats["step_seconds"]
                self.step_cpu_seconds = c0 + stats["step_cpu_seconds"]
                self.rows_stepped = r0 + stats["rows_stepped"]
            case messages.Log(fields):
                record = logging.makeLogRecord(fields)
                logging.getLogger(record.name).handle(record)
            case messages.Fatal(reason, user_error, message):
                if self._serving:
                    log.error("model worker pid %d: %s", proc.process.pid, reason)
                err = {c.__name__: c for c in USER_ERRORS}.get(user_error, RuntimeError)
                self._fatal = err(message) if user_error else RuntimeError(f"model worker failed: {reason}")
            case messages.Reply(req, ok, payload):
                done = self._pending.pop(req, None)
                if done is None:
                    log.warning("unexpected reply %r from the model worker", (req, ok))
                    bulk.discard(payload, self._bulk)
                elif ok and isinstance(payload, dict) and isinstance(payload.get("data"), bulk.Bulk):
                    self._spawn_task(self._reply_bulk(done, payload))  # read off the event loop
                else:
                    done(ok, payload)
            case messages.Ready() | messages.Telemetry() | messages.Error():
                self._slot_message(proc, msg)

    def _slot_message(self, proc: _Proc, msg: messages.Ready | messages.Telemetry | messages.Error) -> None:
        slot = self.slots[msg.slot]
        self._drain(proc)  # frames before the event, in order
        if slot.conv_id != msg.conv or slot.sink is None:
            return
        match msg:
            case messages.Ready(telemetry=telemetry):
                slot.ready = True
                slot.sink(Event(EventKind.READY, telemetry=telemetry, frame=0))
            case messages.Telemetry(telemetry=telemetry, frame=frame):
                slot.sink(Event(EventKind.TELEMETRY, telemetry=telemetry, frame=frame))
            case messages.Error(reason=reason, detail=detail):
                slot.sink(Event(EventKind.ERROR, reason=reason, detail=detail))

    def _on_exit(self, proc: _Proc) -> None:
        self._detach(proc)
        if proc is not self._proc:
            return
        proc.process.join(1)  # the sentinel fired: reaping takes microseconds
        code = proc.process.exitcode
        was_serving, self._serving = self._serving, False
        if self._started is not None and not self._started.done():
            self._started.set_exception(self._fatal or RuntimeError(f"model worker exited with code {code} "
                                                                    "before serving"))
        self._fatal = None
        if self._closing or not was_serving:  # a worker still starting: its starter reports it
            return
        lived = time.monotonic() - proc.started_at
        log.error("model worker pid %d died (exit code %s) after %.1f s: ending %d conversation(s), restarting",
                  proc.process.pid, code, lived, self.active_count())
        self._stats_base = (self.steps, self.step_seconds, self.step_cpu_seconds, self.rows_stepped)
        self._fail_pending(Reason.WORKER_RESTARTED.says())
        for slot in self.slots:
            sink = slot.sink
            slot.conv_id, slot.sink, slot.ready = None, None, False
            slot.pushed.clear()
            if sink is not None:
                sink(Event(EventKind.ERROR, reason=Reason.WORKER_RESTARTED))
        if self.metrics is not None:
            self.metrics.set_active(0)
        if lived > STABLE_S:
            self._failures = 0
        self._restart_task = self._loop.create_task(self._restart())

    def _detach(self, proc: _Proc) -> None:
        loop = self._loop
        for fd in (proc.ctrl, proc.wake_out):
            with contextlib.suppress(OSError, ValueError):
                loop.remove_reader(fd.fileno())
        with contextlib.suppress(OSError, ValueError):
            loop.remove_reader(proc.process.sentinel)
        proc.close()

    async def _restart(self) -> None:
        while not self._closing:
            delay = min(RESTART_BACKOFF_MAX_S, RESTART_BACKOFF_S * 2 ** self._failures)
            self._failures += 1
            await asyncio.sleep(delay)
            try:
                await self._spawn()
            except Exception as e:  # noqa: BLE001 — logged, retried with a longer backoff
                log.error("model worker restart failed: %s", e)
                continue
            self.restarts += 1
            if self.metrics is not None:
                self.metrics.inc_worker_restarts()
            return


__all__: tp.Sequence[str] = ["WorkerEngine", "RemoteSlot"]

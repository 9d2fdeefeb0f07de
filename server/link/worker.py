"""The model worker process: owns Mimi + LMGen + the fold clock (an `Engine`, and the GPU when there is
one) and steps the batch; the web process (`remote.WorkerEngine`) owns sockets, Opus, sessions, metrics
and admission. Started with the `spawn` method (CUDA state does not survive fork).

Transport (`shm_ring`): per slot, a fixed input and output PCM ring in shared memory, no pickling per
frame; a byte on a wake pipe after writes in each direction. Control messages are the dataclasses of
`messages` on a duplex `multiprocessing` pipe; the engine's metric calls cross as `MetricCall`s
(`MetricsRelay`), its log records as `Log`.
A worker whose control pipe reaches EOF (the web process died) stops.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing.connection as mpc
import os
import signal
import sys
import threading
import time
import typing as tp

from ..core.config import ServeConfig
from ..core.events import Event, EventKind
from ..core.reasons import Reason
from . import bulk
from .messages import (
    Attach,
    Claim,
    Error,
    Fatal,
    Log,
    MetricCall,
    MetricsFlush,
    Ready,
    Release,
    Reply,
    Restore,
    Snapshot,
    Started,
    Stop,
    Telemetry,
    ToWeb,
    ToWorker,
)
from .shm_ring import Rings

log = logging.getLogger("moshi_ttt.server.worker")

FLUSH_S = 0.1  # seconds between metric flushes to the web process
USER_ERRORS = (FileNotFoundError, ValueError, OSError)  # re-raised as such by the web process (exit code 2)


class MetricsRelay:
    """Stands in for `Metrics` in the worker: each call of a `FORWARDED` method is queued as a `MetricCall`
    and replayed on the web process's `Metrics` (`replay`), where the Prometheus registry lives; the web
    process keeps the `KEPT` ones itself (it counts its slots, it knows the layers from Started)."""

    FORWARDED = frozenset({"observe_step", "observe_frame_latency", "observe_transport", "inc_ttt", "set_drift",
                           "clear_drift", "observe_memory_pause"})
    KEPT = frozenset({"set_active", "set_ttt_layers"})

    def __init__(self):
        self._calls: list[MetricCall] = []
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> tp.Callable[..., None]:
        if name in MetricsRelay.FORWARDED:
            return functools.partial(self._record, name)
        if name in MetricsRelay.KEPT:
            return _ignore
        raise AttributeError(f"{type(self).__name__} has no {name!r}: not a Metrics method the engine may call")

    def _record(self, name: str, *args) -> None:
        with self._lock:
            self._calls.append(MetricCall(name, args))

    def drain(self) -> list[MetricCall]:
        with self._lock:
            calls, self._calls = self._calls, []
        return calls

    @staticmethod
    def replay(metrics: tp.Any, calls: list[MetricCall]) -> None:
        """The worker's calls, on the web process's `Metrics`."""
        for call in calls:
            if call.name in MetricsRelay.FORWARDED:
                getattr(metrics, call.name)(*call.args)


def _ignore(*args) -> None:
    pass


class _Sender:
    """The worker's end of the control pipe, shared by its threads."""

    def __init__(self, ctrl):
        self.ctrl = ctrl
        self.lock = threading.Lock()

    def __call__(self, msg: ToWeb) -> None:
        with self.lock:
            self.ctrl.send(msg)


class _PipeLogHandler(logging.Handler):
    """Sends the worker's log records to the web process (one log for the server; pytest's caplog)."""

    def __init__(self, send: _Sender):
        super().__init__()
        self.send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            exc = self.format(record).split("\n", 1)[1] if record.exc_info else None
            self.send(Log({"name": record.name, "levelno": record.levelno, "levelname": record.levelname,
                           "msg": record.getMessage(), "args": None, "exc_text": exc, "created": record.created,
                           "processName": "model-worker", "process": record.process}))
        except Exception:  # noqa: BLE001 — the pipe is gone: the web process is too
            self.handleError(record)


class _Bridge:
    """The worker's main thread: control messages and input rings in, engine events out."""

    def __init__(self, engine, ctrl, wake_in, wake_out, relay: MetricsRelay, send: _Sender):
        self.engine = engine
        self.ctrl = ctrl
        self.wake_in = wake_in
        self.wake_out_fd = wake_out.fileno()
        self.wake_out = wake_out
        self.relay = relay
        self.rings: Rings | None = None
        self.bulk: bulk.Channel | None = None  # where memory bytes go to the web process, sealed (`bulk`)
        self.send = send
        self._last_flush = 0.0
        self._last_stats: dict = {}

    def _wake_web(self) -> None:
        try:
            os.write(self.wake_out_fd, b"\1")
        except BlockingIOError:  # the pipe is full: the web process has a wake-up pending anyway
            pass

    def sink_for(self, index: int, conv: int):
        def sink(ev: Event) -> None:  # engine thread
            if ev.kind is EventKind.FRAME:
                if not self.rings.put_output(index, conv, ev.frame, ev.text_id, ev.pcm, time.monotonic()):
                    log.warning("slot %d: output ring full, frame %d dropped", index, ev.frame)
                self._wake_web()
            elif ev.kind is EventKind.READY:
                self.send(Ready(index, conv, ev.telemetry))
            elif ev.kind is EventKind.TELEMETRY:
                self.send(Telemetry(index, conv, ev.telemetry, ev.frame))
            elif ev.kind is EventKind.ERROR:
                self._wake_web()
                self.send(Error(index, conv, ev.reason or Reason.INTERNAL, ev.detail))
        return sink

    def run(self) -> int:
        os.set_blocking(self.wake_out_fd, False)
        waitables = [self.ctrl, self.wake_in]
        while True:
            ready = mpc.wait(waitables, timeout=FLUSH_S)
            if self.wake_in in ready:
                try:
                    os.read(self.wake_in.fileno(), 65536)
                except BlockingIOError:
                    pass
                except OSError:
                    return self._stop("wake pipe closed")
                self._move_inputs()
            if self.ctrl in ready:
                try:
                    while self.ctrl.poll():
                        msg = self.ctrl.recv()
                        if isinstance(msg, Stop):
                            return self._stop(None)
                        self._command(msg)
                except (EOFError, OSError):
                    return self._stop("the web process is gone")
                self._move_inputs()  # frames of a conversation may have come with its claim
            if not self.engine.alive:
                self.send(Fatal(f"engine stopped: {self.engine.failure!r}"))
                return 1
            self._flush()

    def _command(self, msg: ToWorker) -> None:
        slots = self.engine.slots
        match msg:
            case Attach(rings, channel):
                self.rings, self.bulk = Rings(**rings), channel
            case Claim(index, conv):
                if self.engine.claim_at(self.sink_for(index, conv), index, conv) is None:
                    self.send(Error(index, conv, Reason.INTERNAL, "slot still in use in the model worker"))
            case Release(index, conv):
                self.engine.release(slots[index], conv)
            case Snapshot(req, index, conv, final):
                self._move_inputs()  # frames written before the request are the conversation's
                self.engine.save_memory(slots[index], conv, self._replier(req), final)
            case Restore(req, index, conv, data):
                read = functools.partial(bulk.take, data, self.bulk)  # on the memory thread
                self.engine.restore_memory(slots[index], conv, read, self._replier(req))
            case _:
                log.warning("unknown control message %r", type(msg).__name__)

    def _replier(self, req: int):
        def reply(ok: bool, payload) -> None:  # the engine or memory thread
            if ok and isinstance(payload, dict) and isinstance(payload.get("data"), bytes):
                try:
                    payload = {**payload, "data": bulk.put(payload["data"], self.bulk)}  # memory thread
                except OSError as e:  # answered at once: the web side must not wait for a reply that never comes
                    log.warning("memory bytes to the web process: %s", e)
                    ok, payload = False, f"memory bytes to the web process: {e}"
            try:
                self.send(Reply(req, ok, payload))
            except (OSError, ValueError):  # the web process is gone
                pass
        return reply

    def _move_inputs(self) -> None:
        if self.rings is None:
            return
        now = time.monotonic()
        for i in range(self.rings.n):
            for conv, t_push, pcm in self.rings.take_input(i):
                self.relay.observe_transport("in", now - t_push)
                self.engine.push_at(self.engine.slots[i], conv, [pcm], t_push)

    def _flush(self) -> None:
        now = time.monotonic()
        if now - self._last_flush < FLUSH_S:
            return
        self._last_flush = now
        calls = self.relay.drain()
        e = self.engine
        stats = {"steps": e.steps, "step_seconds": e.step_seconds, "step_cpu_seconds": e.step_cpu_seconds,
                 "rows_stepped": e.rows_stepped}
        if calls or stats != self._last_stats:
            self._last_stats = stats
            self.send(MetricsFlush(calls, stats))

    def _stop(self, why: str | None) -> int:
        """`why` None: the web process asked (it removes the bulk directory itself); else it is gone, and the
        worker removes the directory, which nobody else will."""
        if why:
            log.warning("model worker stopping: %s", why)
            bulk.remove_dir(self.bulk.directory if self.bulk is not None else None)
        self.engine.stop()
        try:
            self._flush_now()
        except (OSError, EOFError):
            pass
        if self.rings is not None:
            self.rings.close()
        return 0

    def _flush_now(self) -> None:
        self._last_flush = 0.0
        self._flush()


def worker_main(cfg: ServeConfig, ctrl, wake_in, wake_out) -> None:
    """Process entry point (spawned): load, report "started", then bridge until "stop"."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the web process decides
    send = _Sender(ctrl)
    root = logging.getLogger()
    root.handlers[:] = [_PipeLogHandler(send)]
    root.setLevel(getattr(logging, cfg.log_level.upper()))
    from ..step.build_engine import load

    relay = MetricsRelay()
    try:
        loaded = load(cfg, metrics=relay)
    except BaseException as e:  # noqa: BLE001 — reported to the web process, then exit 1
        user_error = isinstance(e, USER_ERRORS)  # a bad flag or file: one line, as without the worker
        if not user_error:
            log.exception("model worker failed to start")
        try:
            send(Fatal(f"{type(e).__name__}: {e}", type(e).__name__ if user_error else None, str(e)))
        finally:
            sys.exit(1)
    engine = loaded.engine
    info = dict(loaded.info, frame_size=engine.frame_size, sample_rate=engine.sample_rate,
                memory_fingerprint=engine.memory_fingerprint,
                frame_seconds=engine.frame_seconds, pieces=engine.pieces)
    bridge = _Bridge(engine, ctrl, wake_in, wake_out, relay, send)
    bridge.send(Started(info))
    sys.exit(bridge.run())

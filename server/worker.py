"""The model worker process: owns Mimi + LMGen + the fold clock (an `Engine`, and the GPU when there is
one) and steps the batch; the web process (`remote.WorkerEngine`) owns sockets, Opus, sessions, metrics
and admission. Started with the `spawn` method (CUDA state does not survive fork).

Transport (`shm_ring`): per slot, a fixed input and output PCM ring in shared memory, no pickling per
frame; a byte on a wake pipe after writes in each direction. Control messages are small tuples on a
duplex `multiprocessing` pipe:

web → worker   ("attach", rings spec, bulk dir)  once, after "started"
               ("claim", slot, conv)            reset the row for a new conversation → "ready"
               ("release", slot, conv)
               ("snapshot", req, slot, conv, final)   conversation memory (`slot_memory`): the memory file
               ("restore", req, slot, conv, data)     bytes out / in; each answered ("reply", req, ok, payload)
               ("stop",)                        clean exit, code 0
worker → web   ("started", info)                model loaded and warm: info = model description + "frame_size",
                                                "sample_rate", "frame_seconds", "pieces" (text id → piece)
               ("ready", slot, conv, telemetry) ("telemetry", slot, conv, telemetry, frame)
               ("error", slot, conv, reason, detail)  (a `reasons.Reason`)    ("reply", req, ok, payload)
               ("metrics", ops, stats)          every `FLUSH_S`: metric calls to replay, step counters
               ("fatal", reason, user error class or None, message)   the engine died or did not load:
                                                the process exits 1
               ("log", record fields)           the worker's log records, re-emitted by the web process
A worker whose control pipe reaches EOF (the web process died) stops.
"""

from __future__ import annotations

import logging
import multiprocessing.connection as mpc
import os
import signal
import sys
import threading
import time

from . import bulk
from .events import Event, EventKind
from .reasons import Reason
from .shm_ring import Rings

log = logging.getLogger("moshi_ttt.server.worker")

FLUSH_S = 0.1  # seconds between metric flushes to the web process
USER_ERRORS = (FileNotFoundError, ValueError, OSError)  # re-raised as such by the web process (exit code 2)


class MetricsRelay:
    """Stands in for `Metrics` in the worker: the engine's calls are queued and replayed by the web
    process (`Metrics` and its Prometheus registry live there)."""

    FORWARDED = ("observe_step", "observe_frame_latency", "observe_transport", "inc_ttt", "set_drift", "clear_drift",
                 "observe_memory_pause")

    def __init__(self):
        self._ops: list[tuple] = []
        self._lock = threading.Lock()

    def _record(self, name: str, *args) -> None:
        with self._lock:
            self._ops.append((name, args))

    def observe_step(self, *a) -> None:
        self._record("observe_step", *a)

    def observe_frame_latency(self, *a) -> None:
        self._record("observe_frame_latency", *a)

    def observe_transport(self, *a) -> None:
        self._record("observe_transport", *a)

    def inc_ttt(self, *a) -> None:
        self._record("inc_ttt", *a)

    def set_drift(self, *a) -> None:
        self._record("set_drift", *a)

    def clear_drift(self, *a) -> None:
        self._record("clear_drift", *a)

    def observe_memory_pause(self, *a) -> None:
        self._record("observe_memory_pause", *a)

    def set_active(self, n: int) -> None:  # the web process counts its slots itself
        pass

    def set_ttt_layers(self, layers) -> None:
        pass

    def drain(self) -> list[tuple]:
        with self._lock:
            ops, self._ops = self._ops, []
        return ops


class _Sender:
    """The worker's end of the control pipe, shared by its threads."""

    def __init__(self, ctrl):
        self.ctrl = ctrl
        self.lock = threading.Lock()

    def __call__(self, msg: tuple) -> None:
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
            self.send(("log", {"name": record.name, "levelno": record.levelno, "levelname": record.levelname,
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
        self.bulk_dir: str | None = None  # where memory bytes go to the web process (`bulk`)
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
                self.send(("ready", index, conv, ev.telemetry))
            elif ev.kind is EventKind.TELEMETRY:
                self.send(("telemetry", index, conv, ev.telemetry, ev.frame))
            elif ev.kind is EventKind.ERROR:
                self._wake_web()
                self.send(("error", index, conv, ev.reason, ev.detail))
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
                        if msg[0] == "stop":
                            return self._stop(None)
                        self._command(msg)
                except (EOFError, OSError):
                    return self._stop("the web process is gone")
                self._move_inputs()  # frames of a conversation may have come with its claim
            if not self.engine.alive:
                self.send(("fatal", f"engine stopped: {self.engine.failure!r}"))
                return 1
            self._flush()

    def _command(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "attach":
            self.rings, self.bulk_dir = Rings(**msg[1]), msg[2]
        elif kind == "claim":
            _, index, conv = msg
            if self.engine.claim_at(self.sink_for(index, conv), index, conv) is None:
                self.send(("error", index, conv, Reason.INTERNAL, "slot still in use in the model worker"))
        elif kind == "release":
            _, index, conv = msg
            self.engine.release(self.engine.slots[index], conv)
        elif kind == "snapshot":
            _, req, index, conv, final = msg
            self._move_inputs()  # frames written before the request are the conversation's
            self.engine.save_memory(self.engine.slots[index], conv, self._replier(req), final)
        elif kind == "restore":
            _, req, index, conv, data = msg
            self.engine.restore_memory(self.engine.slots[index], conv, data, self._replier(req))
        else:
            log.warning("unknown control message %r", kind)

    def _replier(self, req: int):
        def reply(ok: bool, payload) -> None:  # the engine or memory thread
            try:
                if ok and isinstance(payload, dict) and isinstance(payload.get("data"), bytes):
                    payload = {**payload, "data": bulk.put(payload["data"], self.bulk_dir)}  # memory thread
                self.send(("reply", req, ok, payload))
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
        ops = self.relay.drain()
        e = self.engine
        stats = {"steps": e.steps, "step_seconds": e.step_seconds, "step_cpu_seconds": e.step_cpu_seconds,
                 "rows_stepped": e.rows_stepped}
        if ops or stats != self._last_stats:
            self._last_stats = stats
            self.send(("metrics", ops, stats))

    def _stop(self, why: str | None) -> int:
        if why:
            log.warning("model worker stopping: %s", why)
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


def worker_main(args, ctrl, wake_in, wake_out, log_level: str = "info") -> None:
    """Process entry point (spawned): load, report "started", then bridge until "stop"."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the web process decides
    send = _Sender(ctrl)
    root = logging.getLogger()
    root.handlers[:] = [_PipeLogHandler(send)]
    root.setLevel(getattr(logging, log_level.upper()))
    from .model import load

    relay = MetricsRelay()
    try:
        loaded = load(args, metrics=relay)
    except BaseException as e:  # noqa: BLE001 — reported to the web process, then exit 1
        user_error = isinstance(e, USER_ERRORS)  # a bad flag or file: one line, as without the worker
        if not user_error:
            log.exception("model worker failed to start")
        try:
            send(("fatal", f"{type(e).__name__}: {e}", type(e).__name__ if user_error else None, str(e)))
        finally:
            sys.exit(1)
    engine = loaded.engine
    info = dict(loaded.info, frame_size=engine.frame_size, sample_rate=engine.sample_rate,
                memory_fingerprint=engine.memory_fingerprint,
                frame_seconds=engine.frame_seconds, pieces=engine.pieces)
    bridge = _Bridge(engine, ctrl, wake_in, wake_out, relay, send)
    bridge.send(("started", info))
    sys.exit(bridge.run())

"""The server's Prometheus metrics, kept by `prometheus_client` in a registry of their own (one per server,
so two servers in one process never share counters). `render()` returns the `/metrics` body.

Thread-safe: the engine thread records steps, frame latencies and TTT telemetry; the event loop
records conversations.
"""

from __future__ import annotations

import math
import threading
import time
import typing as tp

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "moshi_ttt_"
CONTENT_TYPE = CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
TRANSPORT_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
MEMORY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
STEP_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15, 0.2, 0.5, 1.0)
TTT_COUNTERS = {"updates": "Fast-weight updates applied (completed chunks).",
                "clips": "Fast-weight deltas clipped to clip_norm.",
                "skipped": "Fast-weight deltas skipped (non-finite)."}
_EMA = 0.1  # weight of the newest step in the step-time and rows-per-step averages


class Metrics:
    """All the server's metrics. Counters only go up; gauges are set."""

    def __init__(self, max_conversations: int = 0, frame_seconds: float = 0.08):
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()  # guards the EMAs and frame_seconds
        self.max_conversations = max_conversations
        self.frame_seconds = frame_seconds
        self._last_step = 0.0  # monotonic time of the last step
        self._step_ema: float | None = None
        self._rows_ema: float | None = None

        def name(n: str) -> str:
            return PREFIX + n

        reg = self.registry
        self._active = Gauge(name("conversations_active"), "Conversations currently holding a slot.", registry=reg)
        Gauge(name("conversations_max"), "Conversation slots (--max-conversations).",
              registry=reg).set(max_conversations)
        self._conversations = Counter(name("conversations_total"), "Conversations accepted since start.",
                                      registry=reg)
        self._rejected = Counter(name("conversations_rejected_total"), "Conversations refused (all slots busy).",
                                 ["reason"], registry=reg)
        self._rejected.labels(reason="busy")
        self._errors = Counter(name("conversation_errors_total"), "Conversations ended by an error, by reason.",
                               ["reason"], registry=reg)
        self._unauthorized = Counter(name("http_unauthorized_total"),
                                     "Requests refused for a missing or wrong API key.", registry=reg)
        self._over_budget = Counter(name("over_budget_total"),
                                    "Conversations closed for exceeding a per-connection budget.", ["budget"],
                                    registry=reg)
        self._http_refused = Counter(name("http_connections_refused_total"), "Connections aborted before a request "
                                     "(over the pending-connection cap, header timeout).", ["reason"], registry=reg)
        Gauge(name("overloaded"), "1 while the batched step (EMA) is longer than a frame: behind real time.",
              registry=reg).set_function(lambda: float(self.behind_real_time() is not None))
        self._latency = Histogram(name("frame_latency_seconds"), "Input frame complete (1920 samples received) to "
                                  "its output frame ready, per frame.", buckets=LATENCY_BUCKETS, registry=reg)
        self._step = Histogram(name("step_seconds"), "Compute time of one batched step (Mimi encode, LM, Mimi "
                               "decode).", buckets=STEP_BUCKETS, registry=reg)
        self._transport = Histogram(name("worker_transport_seconds"), "One PCM frame through the shared-memory "
                                    "ring to the model worker (in) or back (out): written to read.", ["direction"],
                                    buckets=TRANSPORT_BUCKETS, registry=reg)
        self._worker_restarts = Counter(name("worker_restarts_total"), "Model worker processes restarted after "
                                        "dying.", registry=reg)
        self._steps = Counter(name("steps_total"), "Batched steps run.", registry=reg)
        self._frames = Counter(name("frames_total"), "Conversation frames processed (80 ms each).", registry=reg)
        self._audio = Counter(name("audio_seconds_total"), "Seconds of conversation audio processed.", registry=reg)
        Gauge(name("realtime_speed"), "Audio seconds per wall second of each conversation: frame duration / batched "
              "step time (EMA); >= 1 means every conversation keeps up (2 = twice real time).",
              registry=reg).set_function(lambda: _nan_if_none(self.realtime_speed()))
        Gauge(name("throughput_realtime_speed"), "Audio seconds per wall second summed over the conversations of a "
              "step: realtime_speed x conversations per step (EMA).",
              registry=reg).set_function(lambda: _nan_if_none(self._throughput()))
        self._ttt = {what: Counter(name(f"ttt_{what}_total"), help_ + " Summed over conversations, per TTT layer.",
                                   ["layer"], registry=reg) for what, help_ in TTT_COUNTERS.items()}
        self._drift = Gauge(name("ttt_drift"), "Fast-weight drift ||W - W0||_F per TTT layer and active slot.",
                            ["layer", "slot"], registry=reg)
        self._drift_keys: set[tuple[str, str]] = set()
        self.ttt_layers: list[str] = []
        self._mem_saves = Counter(name("memory_saves_total"), "Conversation memories saved, by trigger (checkpoint: "
                                  "every --memory-save-every chunks; end: the conversation ended; resume: re-sealed "
                                  "with the new token).", ["trigger"], registry=reg)
        self._mem_restores = Counter(name("memory_restores_total"), "Conversations resumed from their memory.",
                                     registry=reg)
        self._mem_deletes = Counter(name("memory_deletes_total"), "Memories deleted by their client.", registry=reg)
        self._mem_collected = Counter(name("memory_collected_total"), "Expired memories removed by the store's "
                                      "periodic collection (every --memory-gc-every seconds).", registry=reg)
        self._mem_bytes = Counter(name("memory_bytes_total"), "Memory file bytes (before sealing) saved, read "
                                  "and restored.", ["direction"], registry=reg)
        self._mem_failures = Counter(name("memory_failures_total"), "Memory resumes or deletes refused, and saves "
                                     "failed, by cause (the client always sees the same refusal; a save: stale, "
                                     "quota, store_full, store, save).", ["cause"], registry=reg)
        self._mem_save_s = Histogram(name("memory_save_seconds"), "One save: the slot's state taken between two "
                                     "steps to the sealed file written.", buckets=MEMORY_BUCKETS, registry=reg)
        self._mem_restore_s = Histogram(name("memory_restore_seconds"), "One restore: the memory file bytes to "
                                        "the state in the slot (parse, prepare, copy between two steps).",
                                        buckets=MEMORY_BUCKETS, registry=reg)
        self._mem_pause = Histogram(name("memory_step_pause_seconds"), "Time the model thread spent between two "
                                    "steps on one memory copy (a save's device clones, a restore's copy in).",
                                    buckets=TRANSPORT_BUCKETS, registry=reg)
        self._mem_read_s = Histogram(name("memory_read_seconds"), "Reading and unsealing one memory.",
                                     buckets=MEMORY_BUCKETS, registry=reg)

    # -- recording ---------------------------------------------------------------------------------

    def set_ttt_layers(self, layers: tp.Iterable[int]) -> None:
        self.ttt_layers = [str(i) for i in layers]
        for layer in self.ttt_layers:
            for c in self._ttt.values():
                c.labels(layer=layer)

    def set_active(self, n: int) -> None:
        self._active.set(n)

    def conversation_started(self) -> None:
        self._conversations.inc()

    def rejected_conversation(self, reason: str) -> None:
        self._rejected.labels(reason=reason).inc()

    def inc_error(self, reason: str) -> None:
        self._errors.labels(reason=reason).inc()

    def inc_unauthorized(self) -> None:
        self._unauthorized.inc()

    def observe_step(self, seconds: float, rows: int, batch: int, frame_seconds: float) -> None:
        self._step.observe(seconds)
        self._steps.inc()
        self._frames.inc(rows)
        self._audio.inc(rows * frame_seconds)
        with self._lock:
            self.frame_seconds = frame_seconds
            self._step_ema = seconds if self._step_ema is None else (1 - _EMA) * self._step_ema + _EMA * seconds
            self._rows_ema = rows if self._rows_ema is None else (1 - _EMA) * self._rows_ema + _EMA * rows
            self._last_step = time.monotonic()

    def inc_over_budget(self, budget: str) -> None:
        self._over_budget.labels(budget=budget).inc()

    def inc_http_refused(self, reason: str) -> None:
        self._http_refused.labels(reason=reason).inc()

    def observe_frame_latency(self, seconds: float) -> None:
        self._latency.observe(seconds)

    def observe_transport(self, direction: str, seconds: float) -> None:
        self._transport.labels(direction=direction).observe(seconds)

    def inc_worker_restarts(self) -> None:
        self._worker_restarts.inc()

    def inc_ttt(self, layer: str, what: str, n: int) -> None:
        self._ttt[what].labels(layer=layer).inc(n)

    def set_drift(self, layer: str, slot: int, value: float | None) -> None:
        with self._lock:
            self._drift_keys.add((layer, str(slot)))
            self._drift.labels(layer=layer, slot=str(slot)).set(math.nan if value is None else value)

    def clear_drift(self, slot: int) -> None:
        with self._lock:
            for key in [k for k in self._drift_keys if k[1] == str(slot)]:
                self._drift_keys.discard(key)
                self._drift.remove(*key)

    def observe_memory_save(self, trigger: str, seconds: float, nbytes: int) -> None:
        self._mem_saves.labels(trigger=trigger).inc()
        self._mem_bytes.labels(direction="saved").inc(nbytes)
        if trigger != "resume":
            self._mem_save_s.observe(seconds)

    def observe_memory_read(self, seconds: float, nbytes: int) -> None:
        self._mem_read_s.observe(seconds)
        self._mem_bytes.labels(direction="read").inc(nbytes)

    def observe_memory_restore(self, seconds: float, nbytes: int) -> None:
        self._mem_restores.inc()
        self._mem_restore_s.observe(seconds)
        self._mem_bytes.labels(direction="restored").inc(nbytes)

    def observe_memory_pause(self, seconds: float) -> None:
        self._mem_pause.observe(seconds)

    def inc_memory_failure(self, cause: str) -> None:
        self._mem_failures.labels(cause=cause).inc()

    def inc_memory_deleted(self) -> None:
        self._mem_deletes.inc()

    def inc_memory_collected(self, n: int) -> None:
        self._mem_collected.inc(n)

    # -- reading -------------------------------------------------------------------------------------

    def realtime_speed(self) -> float | None:
        """Audio seconds per wall second of each conversation = frame duration / step time (EMA): ≥ 1 means
        every conversation keeps up with real time (each one needs one batched step per frame)."""
        with self._lock:
            if not self._step_ema:
                return None
            return self.frame_seconds / self._step_ema

    def _throughput(self) -> float | None:
        speed = self.realtime_speed()
        return None if speed is None or self._rows_ema is None else speed * self._rows_ema

    def behind_real_time(self, recent: float = 2.0) -> str | None:
        """None while the model keeps up; else why not ("step 120 ms > frame 80 ms"). Behind = the step
        EMA exceeds the frame duration, judged only while steps run (the last one < `recent` s ago)."""
        with self._lock:
            ema, frame = self._step_ema, self.frame_seconds
            if ema is None or ema <= frame or time.monotonic() - self._last_step > recent:
                return None
        return f"model step {1000 * ema:.0f} ms > frame {1000 * frame:.0f} ms"

    def _value(self, sample: str, **labels: str) -> float:
        return self.registry.get_sample_value(PREFIX + sample, labels) or 0.0

    def _by_label(self, sample: str, label: str) -> dict[str, int]:
        return {s.labels[label]: int(s.value) for fam in self.registry.collect() for s in fam.samples
                if s.name == PREFIX + sample}

    def snapshot(self) -> dict:
        with self._lock:
            step_ema = self._step_ema
        return {
            "active": int(self._value("conversations_active")), "max_conversations": self.max_conversations,
            "conversations_total": int(self._value("conversations_total")),
            "rejected": self._by_label("conversations_rejected_total", "reason"),
            "errors": self._by_label("conversation_errors_total", "reason"),
            "steps_total": int(self._value("steps_total")), "frames_total": int(self._value("frames_total")),
            "step_ms_ema": None if step_ema is None else 1000 * step_ema,
            "realtime_speed": self.realtime_speed(),
        }

    def render(self) -> bytes:
        """The `/metrics` body (Prometheus text format, `CONTENT_TYPE`)."""
        return generate_latest(self.registry)


def _nan_if_none(x: float | None) -> float:
    return math.nan if x is None else x

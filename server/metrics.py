"""Prometheus text exposition (format 0.0.4) of the server's counters, written by hand: no dependency.

Thread-safe: the engine thread records steps, frame latencies and TTT telemetry; the event loop
records conversations. `render()` returns the `/metrics` body.
"""

from __future__ import annotations

import math
import threading
import time
import typing as tp

PREFIX = "moshi_ttt_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
STEP_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15, 0.2, 0.5, 1.0)


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: tp.Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _num(x: float) -> str:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(float(x))


class _Histogram:
    def __init__(self, buckets: tp.Sequence[float]):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, x: float) -> None:
        self.sum += x
        self.count += 1
        for i, b in enumerate(self.buckets):
            if x <= b:
                self.counts[i] += 1
                break

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{_num(b)}"}} {acc}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {_num(self.sum)}")
        out.append(f"{name}_count {self.count}")
        return out

    def quantile(self, q: float) -> float | None:
        """Upper bucket bound below which a fraction q of observations fall (coarse)."""
        if self.count == 0:
            return None
        target, acc = q * self.count, 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            if acc >= target:
                return b
        return math.inf


class Metrics:
    """All the server's metrics. Counters only go up; gauges are set."""

    def __init__(self, max_conversations: int = 0, frame_seconds: float = 0.08):
        self._lock = threading.Lock()
        self.max_conversations = max_conversations
        self.frame_seconds = frame_seconds
        self.active = 0
        self.conversations_total = 0
        self.rejected: dict[str, int] = {"busy": 0}
        self.errors: dict[str, int] = {}
        self.unauthorized_total = 0
        self.over_budget: dict[str, int] = {}  # conversations ended for breaking a budget, by budget
        self.http_refused: dict[str, int] = {}  # connections aborted by the HTTP guard, by reason
        self._last_step = 0.0  # monotonic time of the last step
        self.frame_latency = _Histogram(LATENCY_BUCKETS)
        self.step_time = _Histogram(STEP_BUCKETS)
        self.steps_total = 0
        self.frames_total = 0
        self._step_ema: float | None = None
        self._rows_ema: float | None = None
        self.ttt: dict[str, dict[str, int]] = {}  # layer → {updates, clips, skipped}
        self.drift: dict[tuple[str, int], float] = {}  # (layer, slot) → ‖W − W⁽⁰⁾‖_F
        self.ttt_layers: list[str] = []

    # -- recording ---------------------------------------------------------------------------------

    def set_ttt_layers(self, layers: tp.Iterable[int]) -> None:
        with self._lock:
            self.ttt_layers = [str(i) for i in layers]
            for layer in self.ttt_layers:
                self.ttt.setdefault(layer, {"updates": 0, "clips": 0, "skipped": 0})

    def set_active(self, n: int) -> None:
        with self._lock:
            self.active = n

    def conversation_started(self) -> None:
        with self._lock:
            self.conversations_total += 1

    def rejected_conversation(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def inc_error(self, reason: str) -> None:
        with self._lock:
            self.errors[reason] = self.errors.get(reason, 0) + 1

    def inc_unauthorized(self) -> None:
        with self._lock:
            self.unauthorized_total += 1

    def observe_step(self, seconds: float, rows: int, batch: int, frame_seconds: float) -> None:
        with self._lock:
            self.step_time.observe(seconds)
            self.steps_total += 1
            self.frames_total += rows
            self.frame_seconds = frame_seconds
            a = 0.1
            self._step_ema = seconds if self._step_ema is None else (1 - a) * self._step_ema + a * seconds
            self._rows_ema = rows if self._rows_ema is None else (1 - a) * self._rows_ema + a * rows
            self._last_step = time.monotonic()

    def inc_over_budget(self, budget: str) -> None:
        with self._lock:
            self.over_budget[budget] = self.over_budget.get(budget, 0) + 1

    def inc_http_refused(self, reason: str) -> None:
        with self._lock:
            self.http_refused[reason] = self.http_refused.get(reason, 0) + 1

    def observe_frame_latency(self, seconds: float) -> None:
        with self._lock:
            self.frame_latency.observe(seconds)

    def inc_ttt(self, layer: str, what: str, n: int) -> None:
        with self._lock:
            self.ttt.setdefault(layer, {"updates": 0, "clips": 0, "skipped": 0})[what] += n

    def set_drift(self, layer: str, slot: int, value: float | None) -> None:
        with self._lock:
            self.drift[(layer, slot)] = math.nan if value is None else value

    def clear_drift(self, slot: int) -> None:
        with self._lock:
            for key in [k for k in self.drift if k[1] == slot]:
                del self.drift[key]

    # -- reading -------------------------------------------------------------------------------------

    def real_time_factor(self) -> float | None:
        """Frame duration / step time (EMA): ≥ 1 means every conversation keeps up with real time
        (each one needs one batched step per frame)."""
        with self._lock:
            if not self._step_ema:
                return None
            return self.frame_seconds / self._step_ema

    def behind_real_time(self, recent: float = 2.0) -> str | None:
        """None while the model keeps up; else why not ("step 120 ms > frame 80 ms"). Behind = the step
        EMA exceeds the frame duration, judged only while steps run (the last one < `recent` s ago)."""
        with self._lock:
            ema, frame = self._step_ema, self.frame_seconds
            if ema is None or ema <= frame or time.monotonic() - self._last_step > recent:
                return None
        return f"model step {1000 * ema:.0f} ms > frame {1000 * frame:.0f} ms"

    def snapshot(self) -> dict:
        rtf = self.real_time_factor()
        with self._lock:
            return {
                "active": self.active, "max_conversations": self.max_conversations,
                "conversations_total": self.conversations_total, "rejected": dict(self.rejected),
                "errors": dict(self.errors), "steps_total": self.steps_total, "frames_total": self.frames_total,
                "step_ms_ema": None if self._step_ema is None else 1000 * self._step_ema,
                "real_time_factor": rtf,
            }

    def render(self) -> str:
        rtf = self.real_time_factor()
        with self._lock:
            fams: list[tuple[str, str, str, list[str]]] = []

            def fam(name: str, kind: str, help_: str, samples: list[tuple[dict, float]] | None = None,
                    raw: list[str] | None = None) -> None:
                full = PREFIX + name
                lines = raw if raw is not None else [f"{full}{_labels(lb)} {_num(v)}" for lb, v in samples or []]
                fams.append((full, kind, help_, lines))

            fam("conversations_active", "gauge", "Conversations currently holding a slot.", [({}, self.active)])
            fam("conversations_max", "gauge", "Conversation slots (--max-conversations).",
                [({}, self.max_conversations)])
            fam("conversations_total", "counter", "Conversations accepted since start.",
                [({}, self.conversations_total)])
            fam("conversations_rejected_total", "counter", "Conversations refused (all slots busy).",
                [({"reason": r}, n) for r, n in sorted(self.rejected.items())])
            fam("conversation_errors_total", "counter", "Conversations ended by an error, by reason.",
                [({"reason": r}, n) for r, n in sorted(self.errors.items())])
            fam("http_unauthorized_total", "counter", "Requests refused for a missing or wrong API key.",
                [({}, self.unauthorized_total)])
            fam("over_budget_total", "counter", "Conversations closed for exceeding a per-connection budget.",
                [({"budget": b}, n) for b, n in sorted(self.over_budget.items())])
            fam("http_connections_refused_total", "counter",
                "Connections aborted before a request (over the pending-connection cap, header timeout).",
                [({"reason": r}, n) for r, n in sorted(self.http_refused.items())])
            overloaded = (self._step_ema is not None and self._step_ema > self.frame_seconds
                          and time.monotonic() - self._last_step <= 2.0)
            fam("overloaded", "gauge", "1 while the batched step (EMA) is longer than a frame: behind real time.",
                [({}, float(overloaded))])
            fam("frame_latency_seconds", "histogram",
                "Input frame complete (1920 samples received) to its output frame ready, per frame.",
                raw=self.frame_latency.lines(PREFIX + "frame_latency_seconds"))
            fam("step_seconds", "histogram", "Compute time of one batched step (Mimi encode, LM, Mimi decode).",
                raw=self.step_time.lines(PREFIX + "step_seconds"))
            fam("steps_total", "counter", "Batched steps run.", [({}, self.steps_total)])
            fam("frames_total", "counter", "Conversation frames processed (80 ms each).", [({}, self.frames_total)])
            fam("audio_seconds_total", "counter", "Seconds of conversation audio processed.",
                [({}, self.frames_total * self.frame_seconds)])
            fam("real_time_factor", "gauge",
                "Frame duration / batched step time (EMA); >= 1 means every conversation keeps up.",
                [({}, rtf if rtf is not None else math.nan)])
            thr = None if rtf is None or self._rows_ema is None else rtf * self._rows_ema
            fam("throughput_real_time_factor", "gauge",
                "Audio seconds processed per compute second, summed over the conversations of a step (EMA).",
                [({}, thr if thr is not None else math.nan)])
            for what, help_ in (("updates", "Fast-weight updates applied (completed chunks)."),
                                ("clips", "Fast-weight deltas clipped to clip_norm."),
                                ("skipped", "Fast-weight deltas skipped (non-finite).")):
                fam(f"ttt_{what}_total", "counter", help_ + " Summed over conversations, per TTT layer.",
                    [({"layer": layer}, c[what]) for layer, c in sorted(self.ttt.items(), key=lambda x: int(x[0]))])
            fam("ttt_drift", "gauge", "Fast-weight drift ||W - W0||_F per TTT layer and active slot.",
                [({"layer": layer, "slot": str(slot)}, v) for (layer, slot), v in sorted(self.drift.items())])
            out = []
            for full, kind, help_, lines in fams:
                out.append(f"# HELP {full} {help_}")
                out.append(f"# TYPE {full} {kind}")
                out.extend(lines)
            return "\n".join(out) + "\n"

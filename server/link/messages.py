"""The control messages between the web process (`remote.WorkerEngine`) and the model worker process
(`worker`): one frozen dataclass per kind, pickled on the duplex control pipe. Audio never goes here (the
`shm_ring` rings carry it) nor do memory bytes (a `bulk.Bulk` reference to a sealed file does). Torch-free.

web → worker: Attach once after Started; Claim (reset the row → Ready); Release; Snapshot / Restore
(conversation memory, each answered by one Reply with its `req`); Stop (clean exit, code 0).
worker → web: Started (model loaded and warm); Ready, Telemetry, Error for a conversation; Reply;
MetricsFlush every `worker.FLUSH_S`; Fatal (the engine died or did not load: the process exits 1); Log.
"""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass, field

from ..core.reasons import Reason


@dataclass(frozen=True)
class SlotMessage:
    """About the conversation `conv` in the batch row `slot` (stale once the slot is another's)."""

    slot: int
    conv: int


# -- web → worker ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attach:
    rings: dict  # shm_ring.Rings.spec()
    bulk: tp.Any  # bulk.Channel: the transfer directory and its key (in memory only)


@dataclass(frozen=True)
class Claim(SlotMessage):
    pass


@dataclass(frozen=True)
class Release(SlotMessage):
    pass


@dataclass(frozen=True)
class Snapshot:
    req: int
    slot: int
    conv: int
    final: bool


@dataclass(frozen=True)
class Restore:
    req: int
    slot: int
    conv: int
    data: tp.Any  # bulk.Bulk: the memory file bytes, as a file


@dataclass(frozen=True)
class Stop:
    pass


# -- worker → web ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    info: dict  # the model description + "frame_size", "sample_rate", "frame_seconds", "pieces", ...


@dataclass(frozen=True)
class Ready(SlotMessage):
    telemetry: dict | None


@dataclass(frozen=True)
class Telemetry(SlotMessage):
    telemetry: dict | None
    frame: int


@dataclass(frozen=True)
class Error(SlotMessage):
    reason: Reason
    detail: str = ""


@dataclass(frozen=True)
class Reply:
    req: int
    ok: bool
    payload: tp.Any  # a dict (memory bytes under "data" as a bulk.Bulk), or why it failed


@dataclass(frozen=True)
class MetricCall:
    name: str  # a `Metrics` method the engine in the worker called (`worker.MetricsRelay.FORWARDED`) ...
    args: tuple  # ... with these arguments: the web process replays it


@dataclass(frozen=True)
class MetricsFlush:
    calls: list[MetricCall] = field(default_factory=list)
    stats: dict = field(default_factory=dict)  # the engine's step counters (steps, step_seconds, ...)


@dataclass(frozen=True)
class Fatal:
    reason: str
    user_error: str | None = None  # the class name of a user error (a bad flag or file), re-raised as such
    message: str = ""


@dataclass(frozen=True)
class Log:
    fields: dict  # a log record's fields (logging.makeLogRecord)


ToWorker = Attach | Claim | Release | Snapshot | Restore | Stop
ToWeb = Started | Ready | Telemetry | Error | Reply | MetricsFlush | Fatal | Log

"""What the model side sends to a conversation, shared by the in-process engine and the worker proxy
(torch-free, so that the web process never imports torch)."""

from __future__ import annotations

import enum
import typing as tp
from dataclasses import dataclass

import numpy as np

from .reasons import Reason


class EventKind(enum.Enum):
    READY = "ready"  # the slot was reset; `telemetry` holds the start state
    FRAME = "frame"  # `pcm`, `text`, `frame`; `text_id` the text token, -1 while no audio is generated yet
    TELEMETRY = "telemetry"  # `telemetry`, `frame` = frames processed
    ERROR = "error"  # the conversation cannot go on: `reason` (a `reasons.Reason`), `detail`


@dataclass
class Event:
    """What the engine sends to a conversation (fields by `kind`: `EventKind`)."""

    kind: EventKind
    pcm: np.ndarray | None = None
    text: str | None = None
    frame: int = 0
    telemetry: dict | None = None
    reason: Reason | None = None
    detail: str = ""
    text_id: int = -1


Sink = tp.Callable[[Event], None]


class EngineClosed(RuntimeError):
    pass

"""What the model side sends to a conversation, shared by the in-process engine and the worker proxy
(torch-free, so that the web process never imports torch)."""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass

import numpy as np


@dataclass
class Event:
    """What the engine sends to a conversation.

    kind: "ready" (slot reset; `telemetry` holds the start state), "frame" (`pcm`, `text`, `frame`;
    `text_id` the text token, -1 while no audio is generated yet), "telemetry" (`telemetry`, `frame` =
    frames processed), "error" (`reason`).
    """

    kind: str
    pcm: np.ndarray | None = None
    text: str | None = None
    frame: int = 0
    telemetry: dict | None = None
    reason: str | None = None
    text_id: int = -1


Sink = tp.Callable[[Event], None]


class EngineClosed(RuntimeError):
    pass


WORKER_RESTARTED = "model worker restarted"

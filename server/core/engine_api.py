"""The engine as the web side sees it: `ServingEngine`, implemented with the same signatures by
`step.engine.Engine` (the model in the web process, `--workers 0`) and `link.remote.WorkerEngine` (its proxy
for the model worker process). Sessions, the routes, the HAProxy agent, conversation memory and the CLI use only
this. Torch-free.

A conversation claims a slot (`claim(sink)` → (slot, conversation id), None when all are taken), pushes
its input frames, and releases the slot; the engine answers through `sink` (`events.Event`). Memory
requests answer `done(ok, payload)` once, from any thread.
"""

from __future__ import annotations

import typing as tp

import numpy as np

from .events import Sink

Done = tp.Callable[[bool, tp.Any], None]


class SlotHandle(tp.Protocol):
    """A claimed slot: the batch row `index` of the model."""

    index: int


@tp.runtime_checkable
class ServingEngine(tp.Protocol):
    n: int  # conversation slots (the model's batch size)
    sample_rate: int
    frame_size: int  # samples per frame
    frame_seconds: float
    steps: int  # batched steps so far, their wall and CPU seconds, and the conversation frames they served
    step_seconds: float
    step_cpu_seconds: float
    rows_stepped: int

    @property
    def alive(self) -> bool:
        """Serving (False while the model worker restarts)."""

    @property
    def memory_fingerprint(self) -> str | None:
        """The loaded model's memory fingerprint (None: conversation memory is off)."""

    def claim(self, sink: Sink) -> tuple[SlotHandle, int] | None:
        """A free slot and a new conversation id, or None; `events.EngineClosed` while not serving."""

    def push(self, slot: SlotHandle, conv_id: int, frames: list[np.ndarray]) -> bool:
        """Queues input frames of `frame_size` float32 samples; False once the slot is not this conversation's."""

    def release(self, slot: SlotHandle, conv_id: int) -> None:
        """Frees the slot (idempotent)."""

    def save_memory(self, slot: SlotHandle, conv_id: int, done: Done, final: bool = False) -> None:
        """The conversation's memory file bytes, taken between two steps (`final`: after its queued frames)."""

    def restore_memory(self, slot: SlotHandle, conv_id: int, data: tp.Any, done: Done) -> None:
        """Puts a memory file into the conversation's slot (claimed, reset, not stepped yet)."""

    def active_count(self) -> int: ...

    def queued_frames(self, slot: SlotHandle) -> int: ...

    def oldest_wait(self) -> float:
        """Seconds the oldest queued input frame of any conversation has waited; 0 if none."""

    async def close(self, timeout: float = 10.0) -> None:
        """Stops the model (the worker: "stop", killed after `timeout`)."""

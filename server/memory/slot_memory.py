"""The model side of conversation memory, in the process that steps the model (`step.engine.Engine`).

Between two steps, on the engine thread, only copies of one slot's TTT state: `take` (device-side clones,
`moshi_ttt.models.lm_memory.take`) for a save, `put` (`lm_memory.put`, one copy per layer, right after the slot's
reset) for a restore. Everything else runs on this object's own thread: for a save, closing the last chunk,
the deltas and the file bytes (`lm_memory.build`, `memory_format.dumps`: the device-to-host copy happens here);
for a restore, parsing and checking the file and W⁽⁰⁾ + Δ on the device (`memory_format.loads`,
`lm_memory.prepare`). The memory file bytes are what crosses to the web process, which seals and stores them.

On CUDA the memory thread works on its own stream (a non-blocking one, so that its device-to-host copy never
queues in front of the engine's kernels), ordered after the engine's clones / before the engine's `put` by
CUDA events. `done(ok, payload)` callbacks run on that thread (or on the engine thread for a refusal): a
save's payload is {"data": file bytes, "frames", "chunks", "compression", "created"} ("data" None: a new
conversation that heard nothing, nothing to store); a restore's {"frames",
"telemetry"} once the state is in the slot; a failure's payload is the reason (for logs).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import typing as tp

import torch

from moshi_ttt.memory.compression import Compression
from moshi_ttt.models import lm_memory as mem
from moshi_ttt.models import memory_format as mf

from ..core.engine_api import Done

log = logging.getLogger("moshi_ttt.server.memory")



def _header_only(m: mem.Memory) -> mem.Memory:
    """`m` without its tensors: what `lm_memory.build` needs of the memory a conversation resumed from."""
    layers = {i: mem.LayerMemory(torch.empty(0), None, dict(lm.counters)) for i, lm in m.layers.items()}
    return dataclasses.replace(m, layers=layers)


class SlotMemory:
    """Per loaded model: its fingerprint, the stored form (`compression`: exact, bf16, rank:R), one worker
    thread and, per slot, the memory its conversation resumed from (header and counters only)."""

    def __init__(self, lm, compression: str = "exact"):
        self.lm = lm
        self.comp = Compression.parse(compression)
        self.fingerprint = mem.fingerprint(lm)
        self.base: dict[int, mem.Memory] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="moshi-ttt-memory")
        self._cuda = next(lm.parameters()).device.type == "cuda"
        self._stream = torch.cuda.Stream() if self._cuda else None

    def streaming_started(self) -> None:
        """Engine thread, once streaming: every slot logs its folded chunks as factors, in every format, up
        to that format's own size (a short conversation is stored as factors, smaller than the format's form)."""
        mem.keep_factors(self.lm, comp=self.comp)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _event(self):
        """A CUDA event recorded on the current stream (None on the CPU)."""
        if not self._cuda:
            return None
        ev = torch.cuda.Event()
        ev.record()
        return ev

    def _side(self):
        """The memory thread's stream as the current one (nothing on the CPU)."""
        return torch.cuda.stream(self._stream) if self._cuda else contextlib.nullcontext()

    # -- save ----------------------------------------------------------------------------------------------

    def take(self, index: int, done: Done) -> None:
        """Engine thread, between steps: clones slot `index`'s state; the rest runs on the memory thread."""
        taken = mem.take(self.lm, index)
        base, ev = self.base.get(index), self._event()
        self._pool.submit(self._finish_save, taken, base, ev, done)

    def _finish_save(self, taken: mem.Taken, base: mem.Memory | None, ev, done: Done) -> None:
        try:
            with torch.inference_mode(), self._side():
                if ev is not None:
                    self._stream.wait_event(ev)  # after the engine's clones
                m = mem.build(self.lm, taken, self.fingerprint, base)
                data = None if m is None else mf.dumps(m, self.comp)  # its host copies synchronise this stream only
        except Exception as e:  # noqa: BLE001 — reported to the web process, which logs it
            log.exception("memory save failed")
            done(False, f"{type(e).__name__}: {e}")
            return
        if m is None:  # a new conversation that heard nothing: nothing to store
            done(True, {"data": None, "frames": 0, "chunks": 0, "compression": str(self.comp), "created": None})
            return
        done(True, {"data": data, "frames": m.frames, "chunks": m.chunks, "compression": str(self.comp),
                    "created": m.created})

    # -- restore -------------------------------------------------------------------------------------------

    def prepare(self, data: bytes | tp.Callable[[], bytes], then: tp.Callable[[tp.Any, mem.Memory, tp.Any], None],
                done: Done) -> None:
        """Any thread: on the memory thread reads `data` (the file bytes, or a callable that reads them: the
        worker's bulk file), parses it and prepares it for this model, then calls `then(prepared, header-only
        memory, cuda event)` (which queues the `put`); refusals go to `done`."""
        self._pool.submit(self._prepare, data, then, done)

    def _prepare(self, data: bytes | tp.Callable[[], bytes], then, done: Done) -> None:
        try:
            with torch.inference_mode(), self._side():
                m = mf.loads(data() if callable(data) else data)
                prepared = mem.prepare(self.lm, m, self.fingerprint)
                ev = self._event()  # the engine's stream waits for it before `put`
        except mem.MemoryRefused as e:
            done(False, f"refused: {e}")
            return
        except Exception as e:  # noqa: BLE001
            log.exception("memory restore failed")
            done(False, f"{type(e).__name__}: {e}")
            return
        then(prepared, _header_only(m), ev)

    def put(self, index: int, prepared, header: mem.Memory, ev) -> None:
        """Engine thread, between steps, right after slot `index`'s reset."""
        if ev is not None:
            stream = torch.cuda.current_stream()
            stream.wait_event(ev)
            for snap, factors in prepared.values():  # made on the memory stream, read on this one
                for t in [*snap.values(), *(factors or ())]:
                    t.record_stream(stream)
        mem.put(self.lm, index, prepared)
        self.base[index] = header

    def forget(self, index: int) -> None:
        """The slot was reset for a new conversation."""
        self.base.pop(index, None)

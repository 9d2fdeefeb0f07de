"""N conversation slots sharing one batched Mimi + LMGen (`TTTLMGen`), stepped on one dedicated thread.

Slot i is batch row i of Mimi and of LMGen (LMGen doubles the LM batch itself when cfg_coef ≠ 1). A claim
resets exactly that row (`reset_streaming(mask)`: Mimi, KV cache, offsets, TTT fast weights back to W⁽⁰⁾).
A step takes at most one 1920-sample frame from every slot that has one and runs encode → LM step → decode
for the whole batch, `exec_mask` selecting those rows: the other rows stay exactly unchanged. One input
frame ⇒ one output frame (silence while the acoustic delay fills) plus its text piece. Only the worker
thread touches torch state; other threads use the slot inboxes and a command queue under one condition,
and results go back through each slot's `sink` (on the worker thread). TTT telemetry is read host-side,
never per frame. Batching, telemetry and reset choices: docs/design.md, "Serving engine".
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
import typing as tp
from dataclasses import dataclass, field

import numpy as np
import torch

from moshi_ttt.models.lm import make_lm_gen
from moshi_ttt.models.streams import TEXT_PADDING_IDS

from ..core.events import EngineClosed, Event, EventKind, Sink
from ..core.reasons import Reason
from ..core.threads import start_and_wait
from ..metrics import Metrics

log = logging.getLogger("moshi_ttt.server.engine")



@dataclass
class Slot:
    index: int
    conv_id: int | None = None  # None: free
    sink: Sink | None = None
    ready: bool = False
    inbox: collections.deque = field(default_factory=collections.deque)  # (pcm [1920] float32, t_push)
    last_push: float = 0.0
    frames_in: int = 0  # frames encoded for the current conversation
    frames_out: int = 0
    dirty: bool = False  # stepped since the last telemetry snapshot
    ttt_seen: dict = field(default_factory=dict)  # layer → {updates, clips, skipped} already accounted
    row_conv: int | None = None  # the conversation whose state the row holds (set by its reset; kept after release)


@dataclass
class EngineConfig:
    max_conversations: int = 4  # >= 1 (serve's ServeConfig checks it)
    threads: int = 1
    batch_wait: float = 0.08  # seconds; at most one frame
    telemetry_interval: float = 1.0  # seconds; <= 0 disables periodic telemetry
    telemetry_duty: float = 0.05  # at most this fraction of the worker's time goes to telemetry
    warmup_steps: int = 4  # ≥ 3 so that on CUDA every graph (encoder, LM, depformer, decoder) is captured
    step_delay: float = 0.0  # test hook: seconds added to every step (a model slower than real time)
    fail_step: int = 0  # test hook: the engine's step number (1-based, after warm-up) that raises; 0 = none


class Engine:
    """Owns Mimi, the TTT LM (through LMGen) and the tokenizer; see the module doc."""

    def __init__(self, mimi, lm, tokenizer, config: EngineConfig, metrics: Metrics | None = None,
                 lm_gen_kwargs: dict | None = None, cfg_coef: float = 1.0, condition_tensors=None,
                 device: torch.device | str = "cpu"):
        self.mimi = mimi
        self.lm = lm
        self.tokenizer = tokenizer
        self.cfg = config
        self.metrics = metrics or Metrics()
        self.device = torch.device(device)
        self.cfg_coef = cfg_coef
        # support_out_of_sync: resetting one slot must not mute the others (docs/design.md, "Serving engine")
        self.lm_gen = make_lm_gen(lm, cfg_coef=cfg_coef, condition_tensors=condition_tensors,
                            support_out_of_sync=True, **(lm_gen_kwargs or {}))
        self.n = config.max_conversations
        self.frame_size = int(mimi.frame_size)
        self.sample_rate = int(mimi.sample_rate)
        self.frame_seconds = self.frame_size / self.sample_rate
        self.ttt_layers: list[int] = list(getattr(lm, "ttt_layer_indices", []))
        self.pieces = self._text_pieces(tokenizer)  # text id → piece, None for ids that are not text
        self.slots = [Slot(i) for i in range(self.n)]
        self._cond = threading.Condition()
        self._commands: collections.deque = collections.deque()
        self._next_conv = 1
        self._stop = False
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._fatal: BaseException | None = None
        self._last_telemetry = 0.0
        self._telemetry_every = config.telemetry_interval  # raised if telemetry is slow (large models)
        self.steps = 0
        self.step_seconds = 0.0  # wall time of all steps (benchmarks: mean step = step_seconds / steps)
        self.step_cpu_seconds = 0.0  # the worker thread's CPU time in them
        self.rows_stepped = 0  # conversation frames processed by all steps
        self.memory = None  # slot_memory.SlotMemory when conversation memory is on (set before `start`)
        self._deferred: list[tuple] = []  # final saves waiting for their slot's queued frames

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> None:
        """Starts the worker thread (enters streaming mode, warms up) and waits until it serves."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="moshi-ttt-engine", daemon=True)
        start_and_wait(self._thread, self._started, timeout, "engine", lambda: self._fatal)

    def stop(self, timeout: float = 10.0) -> None:
        """Stops the worker thread (blocking: joins it) and the memory's threads."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("engine thread did not stop within %.0f s", timeout)
        if self.memory is not None:
            self.memory.close()

    async def close(self, timeout: float = 10.0) -> None:
        await asyncio.to_thread(self.stop, timeout)

    @property
    def failure(self) -> BaseException | None:
        """Why the worker thread stopped (None while it runs, or after a clean `stop`)."""
        return self._fatal

    @property
    def thread_ident(self) -> int | None:
        """The worker thread's ident (profilers sample its stacks); None before `start`."""
        return None if self._thread is None else self._thread.ident

    @property
    def memory_fingerprint(self) -> str | None:
        """The loaded model's memory fingerprint (None: conversation memory is off)."""
        return None if self.memory is None else self.memory.fingerprint

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._fatal is None

    # -- API for sessions (any thread) -------------------------------------------------------------

    def claim(self, sink: Sink) -> tuple[Slot, int] | None:
        """A free slot for a new conversation, or None when all are taken. The slot gets reset by the
        worker thread, which then sends `Event(EventKind.READY)` to `sink`."""
        return self.claim_at(sink, None, None)

    def claim_at(self, sink: Sink, index: int | None, conv_id: int | None) -> tuple[Slot, int] | None:
        """`claim` of the slot `index` for the conversation `conv_id` chosen by the caller (the model worker
        process: the web process allocates); None if that slot is taken. None picks as `claim` does."""
        with self._cond:
            if self._stop or not self.alive:
                raise EngineClosed("the engine is not running")
            if index is None:
                free = next((s for s in self.slots if s.conv_id is None), None)
            else:
                free = self.slots[index] if self.slots[index].conv_id is None else None
            if free is None:
                return None
            if conv_id is None:
                conv_id = self._next_conv
            self._next_conv = max(self._next_conv, conv_id) + 1
            free.conv_id, free.sink, free.ready = conv_id, sink, False
            free.inbox.clear()
            free.frames_in = free.frames_out = 0
            free.last_push = 0.0
            self._commands.append(("reset", free.index, conv_id))
            self._cond.notify_all()
            self.metrics.set_active(self.active_count())
            return free, conv_id

    def push(self, slot: Slot, conv_id: int, frames: list[np.ndarray]) -> bool:
        """Queues input frames (each exactly `frame_size` float32 samples). False if the slot is no
        longer this conversation's."""
        return self.push_at(slot, conv_id, frames, None)

    def push_at(self, slot: Slot, conv_id: int, frames: list[np.ndarray], t_push: float | None) -> bool:
        """`push` of frames that were complete at `t_push` (monotonic; None: now), as the model worker
        process knows it from the ring."""
        if not frames:
            return True
        now = time.monotonic() if t_push is None else t_push
        with self._cond:
            if slot.conv_id != conv_id:
                return False
            for f in frames:
                if f.shape != (self.frame_size,):
                    raise ValueError(f"frames must have {self.frame_size} samples, got {f.shape}")
                slot.inbox.append((f, now))
            slot.last_push = now
            self._cond.notify_all()
        return True

    def release(self, slot: Slot, conv_id: int) -> None:
        """Frees the slot (idempotent). Its row is exec-masked from now on; the next claim resets it."""
        with self._cond:
            if slot.conv_id != conv_id:
                return
            slot.conv_id, slot.sink, slot.ready = None, None, False
            slot.inbox.clear()
            self._commands.append(("release", slot.index, conv_id))
            self._cond.notify_all()
            self.metrics.set_active(self.active_count())

    def save_memory(self, slot: Slot, conv_id: int, done, final: bool = False) -> None:
        """Takes the conversation's memory between two steps (`slot_memory`); `final`: once the frames it
        has queued are processed (the conversation ended: nothing heard is lost). `done(ok, payload)`."""
        if self.memory is None:
            done(False, "conversation memory is off")
            return
        with self._cond:
            self._commands.append(("snapshot", slot.index, conv_id, (done, final)))
            self._cond.notify_all()

    def restore_memory(self, slot: Slot, conv_id: int, data: tp.Any, done) -> None:
        """Puts the memory file `data` (bytes, or in the worker a callable that reads the bulk file the web
        process wrote them to) into the conversation's slot (claimed, reset, nothing stepped yet):
        parsed and prepared off the step path, copied in between two steps. `done(ok, payload)`."""
        if self.memory is None:
            done(False, "conversation memory is off")
            return

        def then(prepared, header, ev) -> None:
            with self._cond:
                self._commands.append(("put", slot.index, conv_id, (prepared, header, ev, done)))
                self._cond.notify_all()
        self.memory.prepare(data, then, done)

    @staticmethod
    def _text_pieces(tokenizer) -> list[str | None]:
        """id → text piece ("▁" → space), None for ids that are not text (padding, control, unknown)."""
        if tokenizer is None:
            return []
        out: list[str | None] = []
        for i in range(int(tokenizer.vocab_size())):
            skip = i in TEXT_PADDING_IDS or tokenizer.is_control(i) or tokenizer.is_unknown(i)
            out.append(None if skip else tokenizer.id_to_piece(i).replace("▁", " "))
        return out

    def active_count(self) -> int:
        return sum(s.conv_id is not None for s in self.slots)

    def queued_frames(self, slot: Slot) -> int:
        return len(slot.inbox)

    def oldest_wait(self) -> float:
        """Seconds the oldest queued input frame (any conversation) has been waiting; 0 if none."""
        now = time.monotonic()
        with self._cond:
            return max((now - s.inbox[0][1] for s in self.slots if s.conv_id is not None and s.inbox), default=0.0)

    # -- worker --------------------------------------------------------------------------------------

    def _run(self) -> None:
        if self.device.type == "cpu" and self.cfg.threads > 0:
            torch.set_num_threads(self.cfg.threads)
        try:
            # inference_mode, not no_grad (docs/design.md, "Serving engine"); every tensor of the worker
            # stays in it.
            with torch.inference_mode(), self.mimi.streaming(self.n), self.lm_gen.streaming(self.n):
                self._warmup()
                if self.memory is not None:
                    self.memory.streaming_started()
                self._started.set()
                self._loop()
        except BaseException as e:  # reported to every conversation, then re-raised in start()
            self._fatal = e
            log.exception("engine worker crashed")
            self._fail_all(f"engine stopped ({type(e).__name__}: {e})")
        finally:
            self._started.set()

    def _warmup(self) -> None:
        everyone = torch.ones(self.n, dtype=torch.bool)  # host masks; moshi moves them to the device
        t = time.perf_counter()
        for _ in range(self.cfg.warmup_steps):
            self.compute(everyone, torch.zeros(self.n, 1, self.frame_size), torch.zeros(self.n, dtype=torch.bool))
        self.mimi.reset_streaming(everyone)
        self.lm_gen.reset_streaming(everyone)
        self._idle_masks()
        if self.ttt_layers:
            self._telemetry_rows()
        log.info("engine warm: %d slots, %.1f ms per step (warm-up)", self.n,
                 1000 * (time.perf_counter() - t) / max(1, self.cfg.warmup_steps))

    def _idle_masks(self) -> None:
        none = torch.zeros(self.n, dtype=torch.bool)
        self.mimi.set_exec_mask(none)
        self.lm_gen.set_exec_mask(none)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._commands and not self._has_work() \
                        and not self._telemetry_due():
                    self._cond.wait(self._telemetry_wait())
                if self._stop:
                    return
                commands = list(self._commands)
                self._commands.clear()
            for cmd in commands:
                self._command(*cmd)
            batch = self._select()
            if batch:
                self._step(batch)
            if self._deferred:
                with self._cond:
                    self._commands.extend(self._deferred)
                    self._deferred.clear()
            if self._telemetry_due():
                self._periodic_telemetry()

    def _has_work(self) -> bool:
        return any(s.ready and s.inbox for s in self.slots)

    def _telemetry_due(self) -> bool:
        iv = self._telemetry_every
        return (iv > 0 and bool(self.ttt_layers) and any(s.dirty and s.ready for s in self.slots)
                and time.monotonic() - self._last_telemetry >= iv)

    def _telemetry_wait(self) -> float | None:
        iv = self._telemetry_every
        if iv <= 0 or not any(s.dirty and s.ready for s in self.slots):
            return None
        return max(0.001, self._last_telemetry + iv - time.monotonic())

    def _command(self, kind: str, index: int, conv_id: int, extra: tp.Any = None) -> None:
        slot = self.slots[index]
        if kind in ("snapshot", "put"):
            self._memory_command(kind, slot, conv_id, extra)
            return
        if kind == "release":
            # Account the conversation's last TTT counters (the row is untouched until the next reset);
            # telemetry is not cheap on a large model, so only if it advanced since the last snapshot.
            if slot.dirty and self.ttt_layers:
                slot.dirty = False
                try:
                    self._account_ttt(slot, self._telemetry_rows(), final=True)
                except Exception:
                    log.exception("slot %d: final telemetry failed", index)
            self.metrics.clear_drift(index)
            return
        # reset
        with self._cond:
            if slot.conv_id != conv_id:  # released before we got to it
                return
        mask = torch.zeros(self.n, dtype=torch.bool, device=self.device)
        mask[index] = True
        try:
            self.mimi.reset_streaming(mask)
            self.lm_gen.reset_streaming(mask)
            self._idle_masks()
            rows = self._telemetry_rows() if self.ttt_layers else None
        except Exception as e:
            log.exception("slot %d: reset failed", index)
            self._emit(slot, conv_id, Event(EventKind.ERROR, reason=Reason.INTERNAL, detail=f"slot reset failed ({e})"))
            return
        slot.ttt_seen = {}
        slot.dirty = False
        slot.row_conv = conv_id
        if self.memory is not None:
            self.memory.forget(index)
        tele = self._slot_telemetry(rows, index) if rows is not None else {}
        with self._cond:
            if slot.conv_id != conv_id:
                return
            slot.ready = True
        self._emit(slot, conv_id, Event(EventKind.READY, telemetry=tele, frame=0))

    def _memory_command(self, kind: str, slot: Slot, conv_id: int, extra: tuple) -> None:
        done = extra[0] if kind == "snapshot" else extra[3]
        if slot.row_conv != conv_id:  # its row was reset for another conversation, or never was its own
            done(False, f"slot {slot.index} no longer holds conversation {conv_id}")
            return
        try:
            if kind == "snapshot":
                with self._cond:
                    waiting = slot.conv_id == conv_id and bool(slot.inbox)
                if extra[1] and waiting:
                    self._deferred.append(("snapshot", slot.index, conv_id, extra))
                    return
                t0 = time.perf_counter()
                self.memory.take(slot.index, done)
                self.metrics.observe_memory_pause(time.perf_counter() - t0)
                return
            prepared, header, ev, _ = extra
            with self._cond:
                live = slot.conv_id == conv_id and slot.frames_in == 0
            if not live:
                done(False, f"slot {slot.index}: conversation {conv_id} ended or stepped before its restore")
                return
            t0 = time.perf_counter()
            self.memory.put(slot.index, prepared, header, ev)
            rows = self._telemetry_rows() if self.ttt_layers else {}  # the restored drift, for the first 0x04
            tele = self._slot_telemetry(rows, slot.index) if rows else {}
            self.metrics.observe_memory_pause(time.perf_counter() - t0)
            slot.ttt_seen = {layer: {k: e[k] for k in ("updates", "clips", "skipped")} for layer, e in tele.items()}
            slot.dirty = False
        except Exception as e:  # noqa: BLE001 — this conversation's memory fails, the others go on
            log.exception("slot %d: memory %s failed", slot.index, kind)
            done(False, f"{type(e).__name__}: {e}")
            return
        done(True, {"frames": header.frames, "telemetry": tele})

    def _select(self) -> list[tuple[Slot, int, np.ndarray, float, bool]]:
        """Pops one frame from each ready slot, after waiting (bounded) for the streaming ones."""
        with self._cond:
            deadline = None
            while not self._stop:
                now = time.monotonic()
                active = [s for s in self.slots if s.ready and s.conv_id is not None]
                have = [s for s in active if s.inbox]
                if not have:
                    return []
                streaming = [s for s in active if s.inbox or now - s.last_push < 2 * self.frame_seconds]
                behind = any(len(s.inbox) > 1 for s in have)
                if len(have) >= len(streaming) or behind or self._commands:
                    break
                if deadline is None:
                    deadline = min(s.inbox[0][1] for s in have) + self.cfg.batch_wait
                if now >= deadline:
                    break
                self._cond.wait(deadline - now)
            batch = []
            for s in self.slots:
                if s.ready and s.conv_id is not None and s.inbox:
                    pcm, t_push = s.inbox.popleft()
                    batch.append((s, s.conv_id, pcm, t_push, s.frames_in == 0))
            return batch

    def compute(self, host_mask: torch.Tensor, pcm: torch.Tensor, first: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One batched step. host_mask [N] bool, pcm [N, 1, frame], first [N] (all CPU). Returns (pcm_out
        [N, frame] CPU, text ids [N] CPU, generated [N] bool CPU) — rows with generated False carry no
        audio yet (acoustic delay)."""
        exec_mask = host_mask.to(self.device)
        self.mimi.set_exec_mask(exec_mask)
        codes = self.mimi.encode(pcm.to(self.device))
        if bool(first.any()):
            # As moshi: the first encoded frame carries the left-padding artefact; re-apply padding
            # on that conversation's next frame. Only the rows that just started are reset.
            self.mimi.reset_streaming(first.to(self.device))
        self.lm_gen.set_exec_mask(host_mask)  # a CPU mask: TTTLMGen's fold clock reads it without a sync
        out = self.lm_gen.step(codes)
        assert out is not None  # support_out_of_sync=True: never None
        audio = out[:, 1:, :]
        gen = exec_mask & (audio >= 0).all(dim=2).all(dim=1)
        if bool(gen.any()):
            self.mimi.set_exec_mask(gen)
            pcm_out = self.mimi.decode(torch.where(gen[:, None, None], audio, torch.zeros_like(audio)))
            pcm_out = torch.where(gen[:, None, None], pcm_out, torch.zeros_like(pcm_out))[:, 0]
        else:
            pcm_out = torch.zeros(self.n, self.frame_size, device=self.device)
        return pcm_out.float().cpu(), out[:, 0, 0].cpu(), gen.cpu()

    def _step(self, batch: list[tuple[Slot, int, np.ndarray, float, bool]]) -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        exec_mask = torch.zeros(self.n, dtype=torch.bool)
        first = torch.zeros(self.n, dtype=torch.bool)
        pcm = torch.zeros(self.n, 1, self.frame_size)
        for slot, _, frame, _, is_first in batch:
            exec_mask[slot.index] = True
            first[slot.index] = is_first
            pcm[slot.index, 0] = torch.from_numpy(frame)
        try:
            if self.cfg.fail_step and self.steps + 1 == self.cfg.fail_step:
                self.steps += 1
                raise RuntimeError("injected failure (--fail-step)")
            pcm_out, text_ids, gen = self.compute(exec_mask, pcm, first)
            if self.cfg.step_delay > 0:
                time.sleep(self.cfg.step_delay)
        except Exception as e:  # fail the conversations of this step, keep serving
            log.exception("step failed for slots %s", [s.index for s, *_ in batch])
            for slot, conv_id, *_ in batch:
                self._emit(slot, conv_id, Event(EventKind.ERROR, reason=Reason.STEP_FAILED, detail=type(e).__name__))
            return
        dt = time.perf_counter() - t0
        self.steps += 1
        self.step_seconds += dt
        self.step_cpu_seconds += time.thread_time() - c0
        self.rows_stepped += len(batch)
        self.metrics.observe_step(dt, len(batch), self.n, self.frame_seconds)
        now = time.monotonic()
        pcm_np = pcm_out.numpy()
        for slot, conv_id, _, t_push, _ in batch:
            i = slot.index
            with self._cond:
                if slot.conv_id != conv_id:  # released (and maybe re-claimed) during the step
                    continue
                slot.frames_in += 1
                slot.dirty = True
                frame_no = slot.frames_out
                slot.frames_out += 1
            text, tid = None, -1
            if bool(gen[i]):
                tid = int(text_ids[i])
                text = self.pieces[tid] if 0 <= tid < len(self.pieces) else None
            self.metrics.observe_frame_latency(now - t_push)
            self._emit(slot, conv_id, Event(EventKind.FRAME, pcm=pcm_np[i].copy(), text=text, frame=frame_no,
                                            text_id=tid))

    # -- telemetry -----------------------------------------------------------------------------------

    def _telemetry_rows(self) -> dict[int, dict[str, list]]:
        """layer → {name: per-slot python list} (first N rows: the CFG twin rows are dropped)."""
        if not self.ttt_layers:
            return {}
        tele = self.lm.ttt_telemetry()
        out = {}
        for layer, d in tele.items():
            out[layer] = {k: v.detach()[: self.n].float().cpu().tolist() for k, v in d.items()}
        return out

    @staticmethod
    def _slot_telemetry(rows: dict[int, dict[str, list]], index: int) -> dict[str, dict[str, float]]:
        res = {}
        for layer, d in rows.items():
            entry = {}
            for k, v in d.items():
                x = float(v[index])
                if k in ("updates", "clips", "skipped", "frames_to_update"):
                    entry[k] = int(x)
                else:
                    entry[k] = x if math.isfinite(x) else None
            res[str(layer)] = entry
        return res

    def _account_ttt(self, slot: Slot, rows: dict, final: bool = False) -> dict:
        tele = self._slot_telemetry(rows, slot.index) if rows else {}
        for layer, entry in tele.items():
            seen = slot.ttt_seen.setdefault(layer, {"updates": 0, "clips": 0, "skipped": 0})
            for k in ("updates", "clips", "skipped"):
                delta = entry[k] - seen[k]
                if delta > 0:
                    self.metrics.inc_ttt(layer, k, delta)
                seen[k] = entry[k]
            if not final:
                self.metrics.set_drift(layer, slot.index, entry["drift"])
        if final:
            self.metrics.clear_drift(slot.index)
        return tele

    def _periodic_telemetry(self) -> None:
        t = time.monotonic()
        self._last_telemetry = t
        try:
            rows = self._telemetry_rows()
        except Exception:
            log.exception("telemetry failed")
            return
        # Drift costs O(d²·h) per conversation and layer: on a 7B model that is far from free, and it
        # runs between steps. Keep its share of the worker's time bounded.
        cost = time.monotonic() - t
        every = max(self.cfg.telemetry_interval, cost / self.cfg.telemetry_duty)
        if every > 1.5 * self._telemetry_every:
            log.warning("TTT telemetry takes %.0f ms: reading it every %.1f s instead of %.1f s",
                        1000 * cost, every, self.cfg.telemetry_interval)
        self._telemetry_every = every
        for slot in self.slots:
            with self._cond:
                conv_id, ok = slot.conv_id, slot.ready and slot.dirty
            if not ok or conv_id is None:
                continue
            slot.dirty = False
            tele = self._account_ttt(slot, rows)
            self._emit(slot, conv_id, Event(EventKind.TELEMETRY, telemetry=tele, frame=slot.frames_in))

    # -- delivery --------------------------------------------------------------------------------------

    def _emit(self, slot: Slot, conv_id: int, event: Event) -> None:
        with self._cond:
            sink = slot.sink if slot.conv_id == conv_id else None
        if sink is None:
            return
        try:
            sink(event)
        except Exception:  # e.g. the session's loop is closed
            log.debug("slot %d: dropping %s event (sink failed)", slot.index, event.kind.value, exc_info=True)

    def _fail_all(self, detail: str) -> None:
        for slot in self.slots:
            with self._cond:
                conv_id = slot.conv_id
            if conv_id is not None:
                self._emit(slot, conv_id, Event(EventKind.ERROR, reason=Reason.INTERNAL, detail=detail))

"""Per-slot PCM rings in one `multiprocessing.shared_memory` block, between the web process and the
model worker: no pickling and one copy per frame each way.

Layout, per slot i (all little-endian, 8-byte aligned):
  input  ring (web → worker):  head int64[2] = (written, read); conv int64[K]; stamp float64[K] (when
                               the frame was complete, monotonic); pcm float32[K, frame]
  output ring (worker → web):  head int64[2]; meta int64[K, 3] = (conv, frame number, text id or -1);
                               stamp float64[K] (when it was written); pcm float32[K, frame]
One producer and one consumer per ring. Entry `seq` lives at `seq % K`; the producer fills the entry,
then advances `written`; the consumer reads entries `read .. written - 1`, then advances `read`. The
counters only grow, so a reader knows what is new without any message. Entries carry their
conversation id: a slot's ring outlives its conversations, and stale entries are simply skipped.
(Stores are ordered on x86-64, and each batch is followed by a pipe write, a full barrier.)
"""

from __future__ import annotations

import typing as tp
from multiprocessing import shared_memory

import numpy as np

WRITTEN, READ = 0, 1


class Ring:
    """One ring: numpy views into the shared block."""

    __slots__ = ("head", "conv", "stamp", "meta", "pcm", "capacity")

    def __init__(self, buf, offset: int, capacity: int, frame: int, out: bool):
        def view(dtype, shape):
            nonlocal offset
            a = np.ndarray(shape, dtype=dtype, buffer=buf, offset=offset)
            offset += a.nbytes
            return a

        self.capacity = capacity
        self.head = view(np.int64, (2,))
        self.meta = view(np.int64, (capacity, 3)) if out else None
        self.conv = None if out else view(np.int64, (capacity,))
        self.stamp = view(np.float64, (capacity,))
        self.pcm = view(np.float32, (capacity, frame))

    @staticmethod
    def nbytes(capacity: int, frame: int, out: bool) -> int:
        meta = 3 * 8 * capacity if out else 8 * capacity
        return 16 + meta + 8 * capacity + 4 * capacity * frame

    def pending(self) -> int:
        return int(self.head[WRITTEN] - self.head[READ])

    def room(self) -> int:
        return self.capacity - self.pending()


class Rings:
    """`n` slots × (input ring of `in_capacity`, output ring of `out_capacity`) frames of `frame`
    float32 samples. The web process creates (and finally unlinks) the block; the worker attaches by
    `name`."""

    def __init__(self, n: int, frame: int, in_capacity: int, out_capacity: int, name: str | None = None):
        if n < 1 or frame < 1 or in_capacity < 1 or out_capacity < 1:
            raise ValueError(f"rings need n, frame, capacities >= 1, got {(n, frame, in_capacity, out_capacity)}")
        self.n, self.frame, self.in_capacity, self.out_capacity = n, frame, in_capacity, out_capacity
        per_slot = Ring.nbytes(in_capacity, frame, False) + Ring.nbytes(out_capacity, frame, True)
        self.owner = name is None
        self.shm = shared_memory.SharedMemory(name=name, create=self.owner, size=n * per_slot if self.owner else 0)
        if self.shm.size < n * per_slot:
            raise ValueError(f"shared memory {self.shm.name} holds {self.shm.size} bytes, rings need {n * per_slot}")
        buf = self.shm.buf
        if self.owner:
            np.ndarray((n * per_slot,), dtype=np.uint8, buffer=buf)[:] = 0
        self.inputs: list[Ring] = []
        self.outputs: list[Ring] = []
        off = 0
        for _ in range(n):
            self.inputs.append(Ring(buf, off, in_capacity, frame, out=False))
            off += Ring.nbytes(in_capacity, frame, False)
            self.outputs.append(Ring(buf, off, out_capacity, frame, out=True))
            off += Ring.nbytes(out_capacity, frame, True)

    @property
    def name(self) -> str:
        return self.shm.name

    def spec(self) -> dict:
        """What the worker needs to attach: `Rings(**spec)`."""
        return {"n": self.n, "frame": self.frame, "in_capacity": self.in_capacity,
                "out_capacity": self.out_capacity, "name": self.name}

    # -- input: web writes, worker reads ---------------------------------------------------------------

    def put_input(self, i: int, conv: int, frames: tp.Sequence[np.ndarray], t_push: float) -> bool:
        """Appends frames to slot i's input ring; False (nothing written) if they do not fit."""
        r = self.inputs[i]
        if len(frames) > r.room():
            return False
        w = int(r.head[WRITTEN])
        for f in frames:
            k = w % r.capacity
            r.conv[k] = conv
            r.stamp[k] = t_push
            r.pcm[k] = f
            w += 1
        r.head[WRITTEN] = w
        return True

    def take_input(self, i: int) -> list[tuple[int, float, np.ndarray]]:
        """Everything new in slot i's input ring: [(conv, t_push, pcm copy [frame])]."""
        r = self.inputs[i]
        rd, w = int(r.head[READ]), int(r.head[WRITTEN])
        out = []
        for seq in range(rd, w):
            k = seq % r.capacity
            out.append((int(r.conv[k]), float(r.stamp[k]), r.pcm[k].copy()))
        r.head[READ] = w
        return out

    # -- output: worker writes, web reads --------------------------------------------------------------

    def put_output(self, i: int, conv: int, frame_no: int, text_id: int, pcm: np.ndarray, stamp: float) -> bool:
        """Appends one output frame to slot i's output ring; False if the ring is full (web not reading)."""
        r = self.outputs[i]
        if r.room() < 1:
            return False
        w = int(r.head[WRITTEN])
        k = w % r.capacity
        r.meta[k] = (conv, frame_no, text_id)
        r.stamp[k] = stamp
        r.pcm[k] = pcm
        r.head[WRITTEN] = w + 1
        return True

    def take_output(self, i: int) -> list[tuple[int, int, int, float, np.ndarray]]:
        """Everything new in slot i's output ring: [(conv, frame number, text id, stamp, pcm copy [frame])]."""
        r = self.outputs[i]
        rd, w = int(r.head[READ]), int(r.head[WRITTEN])
        out = []
        for seq in range(rd, w):
            k = seq % r.capacity
            conv, frame_no, tid = (int(x) for x in r.meta[k])
            out.append((conv, frame_no, tid, float(r.stamp[k]), r.pcm[k].copy()))
        r.head[READ] = w
        return out

    def close(self) -> None:
        """Drops the views and detaches; the owner also unlinks the block."""
        self.inputs.clear()
        self.outputs.clear()
        try:
            self.shm.close()
        except BufferError:  # a view still exported somewhere: the block goes when the process ends
            pass
        if self.owner:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass

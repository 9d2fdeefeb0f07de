"""The shared-memory PCM rings between the web process and the model worker (`server.link.shm_ring`):
bit-exact frames, wrap-around, full rings refuse without writing, entries keep their conversation id,
and a spawned process reads and answers through them (the transport's added latency is reported)."""

import multiprocessing
import os
import statistics
import time

import numpy as np
import pytest
from moshi_ttt.server.link.shm_ring import Rings

FRAME = 1920


def frames(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(FRAME).astype(np.float32) for _ in range(n)]


def test_input_ring_round_trip_wraps_and_refuses_when_full():
    rings = Rings(2, FRAME, in_capacity=5, out_capacity=3)
    peer = Rings(**rings.spec())  # what the worker attaches to
    try:
        sent = frames(12, 0)
        got = []
        for k in range(0, 12, 3):  # 4 batches of 3 through a ring of 5: wraps twice
            assert rings.put_input(1, 7 + k, sent[k:k + 3], t_push=float(k))
            got += peer.take_input(1)
        assert [c for c, _, _ in got] == [7 + k for k in range(0, 12, 3) for _ in range(3)]
        assert [t for _, t, _ in got] == [float(k) for k in range(0, 12, 3) for _ in range(3)]
        assert all(np.array_equal(a, b) for a, b in zip(sent, [p for _, _, p in got], strict=True))
        assert peer.take_input(0) == [] and peer.take_input(1) == []
        assert rings.put_input(0, 1, sent[:5], 0.0)
        assert not rings.put_input(0, 1, sent[:1], 0.0)  # full: refused, nothing written
        assert len(peer.take_input(0)) == 5
    finally:
        peer.close()
        rings.close()


def test_output_ring_carries_meta_and_copies():
    rings = Rings(1, FRAME, in_capacity=2, out_capacity=3)
    peer = Rings(**rings.spec())
    try:
        out = frames(4, 1)
        for k in range(3):
            assert peer.put_output(0, 5, k, 100 + k if k else -1, out[k], stamp=10.0 + k)
        assert not peer.put_output(0, 5, 3, 1, out[3], stamp=0.0)  # full
        got = rings.take_output(0)
        assert [(c, f, t, s) for c, f, t, s, _ in got] == [(5, 0, -1, 10.0), (5, 1, 101, 11.0), (5, 2, 102, 12.0)]
        assert peer.put_output(0, 6, 0, 1, out[3], stamp=0.0)  # the slot's next conversation, same ring
        assert all(np.array_equal(out[k], got[k][4]) for k in range(3))  # copies: not overwritten
        assert rings.take_output(0)[0][0] == 6
    finally:
        peer.close()
        rings.close()
    with pytest.raises(FileNotFoundError):
        Rings(**rings.spec())  # the owner unlinked the block


def test_bad_ring_sizes_are_named():
    with pytest.raises(ValueError, match="capacities"):
        Rings(0, FRAME, 1, 1)


def _echo(spec, wake_in, wake_out, n):
    rings = Rings(**spec)
    done = 0
    while done < n:
        os.read(wake_in.fileno(), 1)
        for conv, _, pcm in rings.take_input(0):
            rings.put_output(0, conv, done, -1, pcm * 2, time.monotonic())
            done += 1
        os.write(wake_out.fileno(), b"\1")
    rings.close()


def test_a_spawned_process_answers_through_the_rings():
    """Frames go to a spawned process and back (doubled), bit-exact and in order. Reports the round trip
    per frame (ring write → wake → read → ring write → wake → read) on this machine."""
    n = 200
    ctx = multiprocessing.get_context("spawn")
    rings = Rings(1, FRAME, in_capacity=4, out_capacity=4)
    in_r, in_w = ctx.Pipe(duplex=False)
    out_r, out_w = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_echo, args=(rings.spec(), in_r, out_w, n), daemon=True)
    p.start()
    try:
        sent = frames(n, 2)
        rtt = []
        for k, f in enumerate(sent):
            t = time.perf_counter()
            assert rings.put_input(0, 3, [f], time.monotonic())
            os.write(in_w.fileno(), b"\1")
            got = []
            while not got:
                os.read(out_r.fileno(), 1)
                got = rings.take_output(0)
            rtt.append(time.perf_counter() - t)
            assert len(got) == 1 and got[0][:2] == (3, k) and np.array_equal(got[0][4], f * 2)
        p.join(10)
        assert p.exitcode == 0
    finally:
        if p.is_alive():
            p.kill()
        rings.close()
    rtt_ms = sorted(1000 * x for x in rtt[10:])
    print(f"\nring round trip per frame ({len(rtt_ms)} frames, load {os.getloadavg()[0]:.1f}): median "
          f"{statistics.median(rtt_ms):.3f} ms, p90 {rtt_ms[int(0.9 * len(rtt_ms))]:.3f} ms, "
          f"max {rtt_ms[-1]:.3f} ms")

"""The encrypted memory store: client-held keys, one refusal for every bad token, delete, TTL, LRU eviction,
and a save killed half-way leaving the previous version readable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from moshi_ttt.memory import seal as ms
from moshi_ttt.memory.seal import MemoryUnavailable, Token
from moshi_ttt.memory.store import MemoryStore

FP = "f" * 64


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def _refused(fn, cause):
    with pytest.raises(MemoryUnavailable) as e:
        fn()
    assert str(e.value) == "memory not available" and cause in e.value.cause, e.value.cause
    return e.value


def test_roundtrip_ciphertext_only_and_key_never_stored(tmp_path):
    store = MemoryStore(tmp_path)
    tok = Token.new()
    data = os.urandom(1000) + b"the secret conversation"
    store.save(tok, FP, data, {"frames": 12})
    assert store.load(str(tok), FP) == data and store.load(tok, FP) == data
    blob = (tmp_path / f"{tok.id}.mem").read_bytes()
    assert b"secret conversation" not in blob and tok.key not in blob and str(tok).split(".")[1].encode() not in blob
    assert Token.parse(str(tok)) == tok and tok.key.hex() not in repr(tok)
    assert [p.name for p in tmp_path.iterdir()] == [f"{tok.id}.mem"]
    assert store.show(tok.id)["frames"] == 12 and "check" not in store.show(tok.id)


def test_segments_cannot_be_cut_reordered_or_moved(tmp_path):
    store = MemoryStore(tmp_path, segment=64)  # 3 segments
    tok = Token.new()
    data = bytes(range(160))
    store.save(tok, FP, data)
    assert store.load(tok, FP) == data
    path = tmp_path / f"{tok.id}.mem"
    blob = path.read_bytes()
    head, off = ms.read_header(blob)
    assert head["segments"] == 3
    seg = 64 + ms.TAG
    swapped = blob[:off] + blob[off + seg:off + 2 * seg] + blob[off:off + seg] + blob[off + 2 * seg:]
    for bad in (swapped, blob[:off + 2 * seg], blob + b"x"):
        path.write_bytes(bad)
        _refused(lambda: store.load(tok, FP), "tampered")
    other = Token(os.urandom(16).hex(), tok.key)  # the same key under another id
    (tmp_path / f"{other.id}.mem").write_bytes(blob)
    _refused(lambda: store.load(other, FP), "wrong key")


def test_every_bad_token_gets_the_same_refusal(tmp_path):
    clock = Clock()
    store = MemoryStore(tmp_path, ttl=100, clock=clock)
    tok = Token.new()
    store.save(tok, FP, b"x" * 100)
    path = tmp_path / f"{tok.id}.mem"
    refusals = [
        _refused(lambda: store.load("garbage", FP), "malformed"),
        _refused(lambda: store.load(Token.new(), FP), "unknown id"),
        _refused(lambda: store.load(Token(tok.id, Token.new().key), FP), "wrong key"),
        _refused(lambda: store.load(tok, "e" * 64), "another model"),
    ]
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 1
    path.write_bytes(bytes(blob))
    refusals.append(_refused(lambda: store.load(tok, FP), "tampered"))
    blob[-5] ^= 1
    head_at = bytes(blob).index(b'"frames"') if b'"frames"' in blob else bytes(blob).index(b'"saved"')
    blob[head_at + 2] ^= 1  # the plaintext header is authenticated too
    path.write_bytes(bytes(blob))
    refusals.append(_refused(lambda: store.load(tok, FP), "tampered"))
    blob[head_at + 2] ^= 1
    path.write_bytes(bytes(blob))
    assert store.load(tok, FP) == b"x" * 100
    clock.t += 101
    refusals.append(_refused(lambda: store.load(tok, FP), "expired"))
    assert {(type(e), str(e), e.args) for e in refusals} == {(MemoryUnavailable, "memory not available",
                                                               ("memory not available",))}


def test_delete_needs_the_key_and_removes_at_once(tmp_path):
    store = MemoryStore(tmp_path)
    tok = Token.new()
    store.save(tok, FP, b"abc")
    _refused(lambda: store.delete(Token(tok.id, Token.new().key)), "wrong key")
    _refused(lambda: store.delete(Token.new()), "unknown id")
    assert (tmp_path / f"{tok.id}.mem").exists()
    store.delete(str(tok))
    assert not (tmp_path / f"{tok.id}.mem").exists()
    _refused(lambda: store.load(tok, FP), "unknown id")
    _refused(lambda: store.delete(tok), "unknown id")


def test_resaving_under_a_new_key_retires_the_old_token(tmp_path):
    store = MemoryStore(tmp_path)
    old = Token.new()
    store.save(old, FP, b"first")
    new = Token.new(old.id)
    assert new.id == old.id and new.key != old.key
    store.save(new, FP, b"second")
    assert store.load(new, FP) == b"second"
    _refused(lambda: store.load(old, FP), "wrong key")


def test_gc_expires_then_evicts_least_recently_used(tmp_path):
    clock = Clock()
    store = MemoryStore(tmp_path, ttl=1000, clock=clock)
    toks = [Token.new() for _ in range(4)]
    for k, t in enumerate(toks):
        clock.t = 1000.0 + k
        store.save(t, FP, b"m" * 1000)
        os.utime(tmp_path / f"{t.id}.mem", (clock.t, clock.t))
    size = store.show(toks[0].id)["bytes"]
    os.utime(tmp_path / f"{toks[0].id}.mem", (2000, 2000))  # toks[0] used last
    clock.t = 1000.0 + 1000.5  # toks[0] (saved at 1000) has expired although recently used
    store.max_bytes = 2 * size
    removed = store.gc()
    assert removed == [toks[0].id, toks[1].id], removed  # expired first, then the LRU of the rest
    assert sorted(e["id"] for e in store.entries()) == sorted(t.id for t in toks[2:])
    store.max_bytes = 0
    newest = Token.new()
    store.save(newest, FP, b"n")  # gc on save never evicts the memory just saved
    assert [e["id"] for e in store.entries()] == [newest.id]


_KILLED_SAVE = textwrap.dedent("""
    import sys, time
    from moshi_ttt.memory.store import MemoryStore

    from moshi_ttt.memory.seal import Token
    class HalfWayStore(MemoryStore):
        def _write(self, path, parts):
            def write(tmp):
                with open(tmp, "wb") as f:
                    blob = b"".join(parts)
                    f.write(blob[: len(blob) // 2])
                    f.flush()
                print("half", flush=True)
                time.sleep(120)
            from moshi_ttt.utils.io import atomic_write
            atomic_write(path, write)

    HalfWayStore(sys.argv[1]).save(Token.parse(sys.argv[2]), sys.argv[3], b"new" * 100000)
""")


def test_a_save_killed_half_way_leaves_the_previous_version(tmp_path):
    store = MemoryStore(tmp_path)
    tok = Token.new()
    store.save(tok, FP, b"old version")
    before = (tmp_path / f"{tok.id}.mem").read_bytes()
    child = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(tmp_path), str(tok), FP],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "half"
        tmps = list(tmp_path.glob("*.tmp"))
        assert len(tmps) == 1 and tmps[0].stat().st_size > 100000  # the torn write exists, beside the target
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert (tmp_path / f"{tok.id}.mem").read_bytes() == before
    assert store.load(tok, FP) == b"old version"
    old = tmps[0].stat().st_mtime - 7200
    os.utime(tmps[0], (old, old))
    store.gc()
    assert not tmps[0].exists()  # a killed writer's leftover is collected

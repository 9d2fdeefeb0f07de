"""The encrypted memory store: client-held keys, one refusal for every bad token, a resume that reads the header
before the body, conditional saves, delete with a tombstone, TTL, quotas and the bound (nothing evicted), `gc`
from listings, files 0600, and a save killed half-way leaving the previous version readable."""

from __future__ import annotations

import base64
import os
import signal
import struct
import subprocess
import sys
import textwrap

import pytest

from moshi_ttt.memory import seal as ms
from moshi_ttt.memory.seal import MemoryUnavailable, Token
from moshi_ttt.memory.store import MemoryStore, QuotaExceeded, StaleWrite, StoreFull

FP = "f" * 64


def _save(store, tok, data, meta=None, owner="local", expect=None):
    return store.save(tok, FP, data, meta, owner=owner, expect=expect)


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
    _save(store, tok, data, {"frames": 12})
    assert store.load(str(tok), FP) == data and store.load(tok, FP) == data
    blob = (tmp_path / f"{tok.id}.mem").read_bytes()
    assert b"secret conversation" not in blob and tok.key not in blob and str(tok).split(".")[1].encode() not in blob
    assert Token.parse(str(tok)) == tok and tok.key.hex() not in repr(tok)
    assert sorted(p.name for p in tmp_path.glob("*")) == [".locks", f"{tok.id}.mem", "owners"]
    for p in [tmp_path, *tmp_path.rglob("*")]:  # files 0600, folders 0700: nothing readable by others
        assert p.stat().st_mode & 0o777 == (0o700 if p.is_dir() else 0o600), (p, oct(p.stat().st_mode))
    assert store.show(tok.id)["frames"] == 12 and "check" not in store.show(tok.id)


def test_segments_cannot_be_cut_reordered_or_moved(tmp_path):
    store = MemoryStore(tmp_path, segment=64)  # 3 segments
    tok = Token.new()
    data = bytes(range(160))
    _save(store, tok, data)
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
    _save(store, tok, b"x" * 100, {"frames": 3})
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
    head_at = bytes(blob).index(b'"frames"')
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
    _save(store, tok, b"abc")
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
    _save(store, old, b"first")
    new = Token.new(old.id)
    assert new.id == old.id and new.key != old.key
    _save(store, new, b"second", expect=store.open(old, FP).version)
    assert store.load(new, FP) == b"second"
    _refused(lambda: store.load(old, FP), "wrong key")


def test_delete_leaves_a_tombstone_that_refuses_later_saves(tmp_path):
    clock = Clock()
    store = MemoryStore(tmp_path, ttl=1000, clock=clock)
    tok = Token.new()
    v = _save(store, tok, b"abc").version
    store.delete(tok)
    with pytest.raises(StaleWrite, match="deleted"):  # a save in flight during the delete: not written back
        _save(store, tok, b"abc again", expect=v)
    with pytest.raises(StaleWrite, match="deleted"):
        _save(store, Token.new(tok.id), b"abc again")
    assert not (tmp_path / f"{tok.id}.mem").exists() and not list((tmp_path / "owners").rglob(f"{tok.id}.*"))
    clock.t += 1001
    store.gc()  # the tombstone outlives every token of the id, then goes
    assert not (tmp_path / f"{tok.id}.gone").exists()


def test_saves_are_conditional_on_the_version_read(tmp_path):
    store = MemoryStore(tmp_path)
    tok = Token.new()
    v1 = _save(store, tok, b"one").version
    with pytest.raises(StaleWrite):  # a create of an existing id
        _save(store, Token.new(tok.id), b"not mine")
    resumed = Token.new(tok.id)  # resumed elsewhere: re-sealed under a new token
    v2 = _save(store, resumed, b"two", expect=store.open(tok, FP).version).version
    assert v2 != v1
    with pytest.raises(StaleWrite, match="meanwhile"):  # the stale instance's save, under the old token
        _save(store, tok, b"stale", expect=v1)
    assert store.load(resumed, FP) == b"two"
    _refused(lambda: store.load(tok, FP), "wrong key")
    with pytest.raises(StaleWrite):  # a replace of a memory that is gone
        _save(store, Token.new(), b"x", expect=v2)


_RACE = textwrap.dedent("""
    import sys
    from moshi_ttt.memory.seal import Token
    from moshi_ttt.memory.store import MemoryStore, StaleWrite
    store, tok = MemoryStore(sys.argv[1]), Token.parse(sys.argv[2])
    sys.stdin.readline()
    try:
        store.save(Token.new(tok.id), "f" * 64, sys.argv[4].encode() * 100000, owner="x", expect=sys.argv[3])
        print("won", flush=True)
    except StaleWrite:
        print("stale", flush=True)
""")


def test_concurrent_saves_from_several_processes_one_wins(tmp_path):
    store = MemoryStore(tmp_path)
    tok = Token.new()
    v = _save(store, tok, b"base").version
    kids = [subprocess.Popen([sys.executable, "-c", _RACE, str(tmp_path), str(tok), v, str(k)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for k in range(4)]
    for k in kids:
        k.stdin.write("go\n")
        k.stdin.flush()
    outs = [k.communicate(timeout=120)[0].strip() for k in kids]
    assert sorted(outs) == ["stale", "stale", "stale", "won"], outs


def test_open_reads_only_the_header_and_checks_the_key_first(tmp_path):
    store = MemoryStore(tmp_path, segment=1 << 20)
    tok = Token.new()
    big = os.urandom(8 << 20)
    _save(store, tok, big)
    store.bytes_read = 0
    wrong = _refused(lambda: store.open(Token(tok.id, Token.new().key), FP), "wrong key")
    assert 0 < store.bytes_read <= 4096  # the header, not the 8 MiB body
    store.bytes_read = 0
    unknown = _refused(lambda: store.open(Token.new(), FP), "unknown id")
    assert store.bytes_read == 0 and (type(wrong), wrong.args) == (type(unknown), unknown.args)
    opened = store.open(tok, FP)
    assert opened.size == (tmp_path / f"{tok.id}.mem").stat().st_size and store.bytes_read <= ms.HEADER_CAP
    assert store.read(opened) == big and store.bytes_read > len(big)


def test_read_refuses_a_memory_changed_since_its_open(tmp_path):
    store = MemoryStore(tmp_path)
    tok = Token.new()
    _save(store, tok, b"first")
    opened = store.open(tok, FP)
    _save(store, tok, b"second", expect=opened.version)
    _refused(lambda: store.read(opened), "changed")
    assert store.load(tok, FP) == b"second"


def test_a_stored_header_is_read_with_a_size_cap(tmp_path):
    store = MemoryStore(tmp_path)
    tok = Token.new()
    huge = ms.MAGIC + struct.pack("<I", 1 << 30) + b"{" * (ms.HEADER_CAP * 2)
    (tmp_path / f"{tok.id}.mem").write_bytes(huge)
    store.bytes_read = 0
    _refused(lambda: store.open(tok, FP), "tampered")
    assert store.bytes_read <= ms.HEADER_CAP
    with pytest.raises(ValueError, match="over the cap"):
        ms.read_header(huge)
    long = Token.new()
    _save(store, long, b"x", {"note": "n" * 10_000})  # a header over the first read, under the cap: read again
    assert store.open(long, FP).header["note"] == "n" * 10_000 and store.load(long, FP) == b"x"


def test_a_token_has_one_spelling(tmp_path):
    tok = Token.new(os.urandom(16).hex())
    text = str(tok)
    assert Token.parse(text) == tok
    last = text[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    sibling = alphabet[alphabet.index(last) ^ 1]  # differs in a bit the decoder drops: the same key
    for other in (text[:-1] + sibling, text + "=", text + "=="):
        assert base64.urlsafe_b64decode(other.split(".")[1] + "=" * (-len(other.split(".")[1]) % 4)) == tok.key
        _refused(lambda other=other: Token.parse(other), "malformed")


def test_owner_quota_refuses_the_21st_memory_and_spares_others(tmp_path):
    store = MemoryStore(tmp_path, quota_memories=20, quota_bytes=None)
    mine = [Token.new() for _ in range(20)]
    versions = [_save(store, t, b"m" * 100, owner="10.0.0.0/24").version for t in mine]
    with pytest.raises(QuotaExceeded) as e:
        _save(store, Token.new(), b"m" * 100, owner="10.0.0.0/24")
    assert e.value.label == "quota"
    _save(store, mine[0], b"m" * 200, owner="10.0.0.0/24", expect=versions[0])  # a replace is no new memory
    _save(store, Token.new(), b"m" * 100, owner="10.0.1.0/24")  # another owner is not affected
    assert len(list(tmp_path.glob("*.mem"))) == 21
    assert b"10.0.0.0" not in b"".join(p.read_bytes() for p in tmp_path.glob("*.mem"))  # a digest, not the owner


def test_owner_byte_quota(tmp_path):
    store = MemoryStore(tmp_path, quota_memories=None, quota_bytes=30_000)
    a = Token.new()
    va = _save(store, a, b"m" * 10_000, owner="o").version
    _save(store, Token.new(), b"m" * 10_000, owner="o")
    with pytest.raises(QuotaExceeded, match="30000"):
        _save(store, Token.new(), b"m" * 10_000, owner="o")
    with pytest.raises(QuotaExceeded):  # growing a memory past the quota
        _save(store, a, b"m" * 25_000, owner="o", expect=va)
    _save(store, a, b"m" * 5_000, owner="o", expect=va)  # shrinking is fine
    _save(store, Token.new(), b"m" * 10_000, owner="o")


def test_a_full_store_refuses_new_memories_and_evicts_nobody(tmp_path):
    store = MemoryStore(tmp_path, max_bytes=5_000)
    toks = [Token.new() for _ in range(2)]
    vs = [_save(store, t, b"m" * 2000, owner=f"o{k}").version for k, t in enumerate(toks)]
    with pytest.raises(StoreFull) as e:
        _save(store, Token.new(), b"m" * 2000, owner="o9")
    assert e.value.label == "store_full" and isinstance(e.value, OSError)
    assert all(store.load(t, FP) == b"m" * 2000 for t in toks)  # nobody evicted
    _save(store, toks[0], b"n" * 2000, owner="o0", expect=vs[0])  # a replace still goes
    assert store.gc() == [] and len(list(tmp_path.glob("*.mem"))) == 2


def test_the_default_bound_follows_the_free_disk(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1000_000, 500_000, 500_000))
    assert MemoryStore(tmp_path).max_bytes == 500_000 - 100_000
    assert MemoryStore(tmp_path, max_bytes=7).max_bytes == 7


def test_gc_decides_from_the_listing_and_spares_a_fresh_save(tmp_path):
    clock = Clock()
    store = MemoryStore(tmp_path, ttl=1000, clock=clock)
    toks = [Token.new() for _ in range(3)]
    for t in toks:
        _save(store, t, b"m" * 1000)
    clock.t += 1000 + 3600 + 1  # all expired, past the grace

    def no_reads(*a, **k):
        raise AssertionError("gc read a memory")

    listed = store.backend.list("", ".mem")
    clock.t -= 5000
    fresh = Token.new(toks[2].id)  # saved by another instance after gc listed it
    _save(store, fresh, b"new", expect=store.open(toks[2], FP).version)
    clock.t += 5000
    store.backend.list = lambda folder="", suffix="", real=store.backend.list: (
        listed if suffix == ".mem" else real(folder, suffix))
    store.backend.head = store.backend.get = no_reads
    removed = store.gc()
    assert sorted(removed) == sorted(t.id for t in toks[:2])  # not the one saved since the listing
    assert (tmp_path / f"{toks[2].id}.mem").exists()
    assert not list((tmp_path / "owners").rglob(f"{toks[0].id}.*"))


_KILLED_SAVE = textwrap.dedent("""
    import sys, time
    from moshi_ttt.memory.backends import LocalBackend
    from moshi_ttt.memory.store import MemoryStore, QuotaExceeded, StaleWrite, StoreFull
    from moshi_ttt.memory.seal import Token
    from moshi_ttt.utils.io import temporary

    class HalfWay(LocalBackend):
        def put(self, loc, parts, now, expect):
            if not loc.name.endswith(".mem"):
                return super().put(loc, parts, now, expect)
            tmp, fd = temporary(loc)
            blob = b"".join(parts)
            import os
            os.write(fd, blob[: len(blob) // 2])
            print("half", flush=True)
            time.sleep(120)

    store = MemoryStore(HalfWay(sys.argv[1]))
    tok = Token.parse(sys.argv[2])
    store.save(tok, sys.argv[3], b"new" * 100000, owner="local", expect=store.open(tok, sys.argv[3]).version)
""")


def test_a_save_killed_half_way_leaves_the_previous_version(tmp_path):
    store = MemoryStore(tmp_path)
    tok = Token.new()
    _save(store, tok, b"old version")
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

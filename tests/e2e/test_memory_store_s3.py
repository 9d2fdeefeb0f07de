"""The memory store on an S3-compatible bucket, end to end against moto's standalone S3 server on loopback
(`moto.server.ThreadedMotoServer`, from the dev dependency `moto[server]`: no real S3 server installs here, and
moto's speaks the S3 protocol over HTTP): save, load, delete, every bad token refused alike, conditional saves
(If-None-Match / If-Match), tombstones, a header-only open (ranged GET), quotas, expiry and gc, S3 failures
as `StoreError`, and `moshi-ttt memory ls/show/rm/gc` on `s3://bucket/prefix`. Outside CI the tests skip when
moto or obstore is not installed; in CI (a dev install) they must run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from moshi_ttt.apps.commands import main
from moshi_ttt.memory import backends as mb
from moshi_ttt.memory.seal import HEADER_CAP, MemoryUnavailable, Token
from moshi_ttt.memory.store import MemoryStore, QuotaExceeded, StaleWrite, StoreError, open_store

if not os.environ.get("CI"):
    pytest.importorskip("moto.server")
    pytest.importorskip("obstore")
import boto3  # noqa: E402  (moto's own dependency: creates the buckets)
import obstore  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402

FP = "f" * 64


def _save(store, tok, data, meta=None, owner="local", expect=None):
    return store.save(tok, FP, data, meta, owner=owner, expect=expect)


class Clock:
    def __init__(self):
        self.t = time.time()  # S3 keeps its own modification times: the store's clock starts at the real one

    def __call__(self):
        return self.t


@pytest.fixture(scope="module")
def s3_server():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_server, monkeypatch, request):
    """A fresh bucket on the loopback server and the AWS environment that reaches it; yields its spec."""
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": s3_server, "AWS_ALLOW_HTTP": "true"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    name = f"mem-{request.node.name.replace('_', '-')[:40].lower()}-{os.urandom(3).hex()}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}/memories"


def _refused(fn, cause):
    with pytest.raises(MemoryUnavailable) as e:
        fn()
    assert str(e.value) == "memory not available" and cause in e.value.cause, e.value.cause


def _objects(store):
    return sorted(o["path"] for page in obstore.list(store.backend.store) for o in page)


def test_save_load_delete_and_one_refusal_on_s3(bucket):
    store = open_store(bucket)
    assert isinstance(store.backend, mb.S3Backend) and store.where == bucket
    tok = Token.new()
    data = os.urandom(3000) + b"the secret conversation"
    saved = _save(store, tok, data, {"frames": 7})
    assert store.load(str(tok), FP) == data
    blob = store.backend.get(f"{tok.id}.mem", saved.version)
    assert b"secret conversation" not in blob and tok.key not in blob  # ciphertext only, no key
    assert [k for k in _objects(store) if not k.startswith("owners/")] == [f"{tok.id}.mem"]
    expires = saved.expires
    e = store.show(tok.id)
    assert e["frames"] == 7 and e["bytes"] == len(blob) and abs(e["expires"] - expires) < 1e-6
    _refused(lambda: store.load(Token(tok.id, Token.new().key), FP), "wrong key")
    _refused(lambda: store.load(Token.new(), FP), "unknown id")
    _refused(lambda: store.load(tok, "e" * 64), "another model")
    obstore.put(store.backend.store, f"{tok.id}.mem", blob[:-1] + bytes([blob[-1] ^ 1]))  # tampered in place
    _refused(lambda: store.load(tok, FP), "tampered")
    obstore.put(store.backend.store, f"{tok.id}.mem", blob)
    _refused(lambda: store.delete(Token(tok.id, Token.new().key)), "wrong key")
    assert store.load(tok, FP) == data
    store.delete(tok)
    assert _objects(store) == [f"{tok.id}.gone"]  # the memory and its owner marker are gone at once
    _refused(lambda: store.load(tok, FP), "unknown id")
    _refused(lambda: store.delete(tok), "unknown id")
    with pytest.raises(StaleWrite, match="deleted"):
        _save(store, tok, data, expect=saved.version)


def test_saves_are_conditional_and_open_reads_the_header_only(bucket):
    store = MemoryStore(mb.backend(bucket), segment=1 << 20)
    old = Token.new()
    v1 = _save(store, old, b"first").version
    new = Token.new(old.id)
    big = os.urandom(12 << 20)
    v2 = _save(store, new, big, expect=v1).version
    store.bytes_read = 0
    _refused(lambda: store.open(old, FP), "wrong key")  # a ranged GET of the header, not the 12 MiB
    assert 0 < store.bytes_read <= HEADER_CAP
    store.bytes_read = 0
    _refused(lambda: store.open(Token.new(), FP), "unknown id")
    assert store.bytes_read == 0
    assert store.load(new, FP) == big
    with pytest.raises(StaleWrite, match="meanwhile"):  # a stale writer: If-Match on the old ETag
        _save(store, old, b"stale", expect=v1)
    with pytest.raises(StaleWrite):  # a create of an existing id: If-None-Match
        _save(store, Token.new(old.id), b"x")
    opened = store.open(new, FP)
    _save(store, new, b"third", expect=v2)
    _refused(lambda: store.read(opened), "changed")  # the body is read only if it is the version opened
    assert store.load(new, FP) == b"third"


def test_quota_expiry_and_gc_on_s3(bucket):
    clock = Clock()
    t0 = clock.t
    store = MemoryStore(mb.backend(bucket), ttl=1000, clock=clock, quota_memories=3)
    toks = [Token.new() for _ in range(3)]
    for t in toks:
        _save(store, t, b"m" * 1000, owner="a")
    with pytest.raises(QuotaExceeded):
        _save(store, Token.new(), b"m" * 1000, owner="a")
    other = Token.new()
    _save(store, other, b"m" * 1000, owner="b")
    clock.t = t0 + 1000.5
    _refused(lambda: store.load(toks[0], FP), "expired")
    with pytest.raises(StaleWrite, match="expired"):
        _save(store, toks[0], b"late", owner="a", expect=store.backend.head(f"{toks[0].id}.mem", 1)[1])
    clock.t = t0 + 1000 + 3600 + 60  # past the grace: gc reads S3's own save times (the real clock)
    assert sorted(store.gc()) == sorted(t.id for t in [*toks, other]) and _objects(store) == []


_KILLED_SAVE = textwrap.dedent("""
    import sys, time
    from moshi_ttt.memory import backends as mb
    from moshi_ttt.memory.store import MemoryStore

    from moshi_ttt.memory.seal import Token
    class HalfWay(mb.S3Backend):  # uploads the first half, then stalls until killed
        def put(self, loc, parts, now, expect):
            if not loc.endswith(".mem"):
                return super().put(loc, parts, now, expect)
            blob = b"".join(parts)
            def stream():
                yield blob[: len(blob) // 2]
                print("half", flush=True)
                time.sleep(120)
                yield blob[len(blob) // 2:]
            self.obs.put(self.store, loc, stream(), chunk_size=5 << 20)

    store, tok = MemoryStore(HalfWay(sys.argv[1])), Token.parse(sys.argv[2])
    store.save(tok, sys.argv[3], b"new" * (4 << 20), owner="local", expect=store.open(tok, sys.argv[3]).version)
""")


def test_a_save_killed_half_way_leaves_the_previous_object(bucket, s3_server):
    store = open_store(bucket)
    tok = Token.new()
    v = _save(store, tok, b"old version").version
    before = store.backend.get(f"{tok.id}.mem", v)
    child = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, bucket, str(tok), FP], stdout=subprocess.PIPE,
                             text=True)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    name = bucket[len("s3://"):].split("/")[0]
    try:
        assert child.stdout.readline().strip() == "half"
        for _ in range(500):  # the upload of the first half is under way (a multipart upload, not an object)
            if s3.list_multipart_uploads(Bucket=name).get("Uploads"):
                break
            time.sleep(0.01)
        assert [u["Key"] for u in s3.list_multipart_uploads(Bucket=name)["Uploads"]] == [f"memories/{tok.id}.mem"]
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert store.backend.get(f"{tok.id}.mem", v) == before and store.load(tok, FP) == b"old version"


def _cli(capsys, *args):
    rc = main(["memory", *args])
    return rc, [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_memory_command_on_s3(bucket, capsys):
    store = open_store(bucket)
    toks = [Token.new(), Token.new()]
    for t in toks:
        _save(store, t, b"private words " * 10, {"frames": 42, "compression": "exact"})
    d = ["--memory-store", bucket]
    rc, rows = _cli(capsys, "ls", *d)
    assert rc == 0 and sorted(r["id"] for r in rows) == sorted(t.id for t in toks)
    assert all(r["frames"] == 42 and "private" not in json.dumps(r) and not {"check", "nonce"} & set(r)
               for r in rows)
    rc, rows = _cli(capsys, "show", toks[0].id, *d)
    assert rc == 0 and rows[0]["id"] == toks[0].id and rows[0]["fingerprint"] == FP
    rc, rows = _cli(capsys, "rm", toks[0].id, *d)
    assert rc == 0 and rows == [{"removed": toks[0].id}]
    assert _cli(capsys, "rm", toks[0].id, *d)[0] == 2 and _cli(capsys, "show", toks[0].id, *d)[0] == 2
    rc, rows = _cli(capsys, "gc", *d)  # nothing expired: nothing removed
    assert rc == 0 and rows == [{"removed": []}] and f"{toks[1].id}.mem" in _objects(store)


def test_a_bad_spec_or_unreachable_bucket_is_a_clear_error(bucket):
    with pytest.raises(ValueError, match="cannot list the bucket"):
        open_store(bucket.replace("s3://", "s3://no-such-").split("/memories")[0] + "/x")
    for bad in ("s3://", "s3:///x", "gs://b/x"):
        with pytest.raises(ValueError, match=bad.split(":")[0]):
            open_store(bad)


def test_s3_failures_are_store_errors(bucket, s3_server, monkeypatch):
    store = open_store(bucket)
    tok = Token.new()
    v = _save(store, tok, b"kept").version
    s3 = boto3.client("s3", endpoint_url=s3_server)
    name = bucket[len("s3://"):].split("/")[0]
    s3.put_bucket_policy(Bucket=name, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Deny", "Principal": "*", "Action": "s3:PutObject", "Resource": f"arn:aws:s3:::{name}/*"}]}))
    try:
        with pytest.raises(StoreError, match=f"memory store {bucket}: writing") as e:  # a denied request
            _save(store, Token.new(tok.id), b"denied", expect=v)
        assert e.value.label == "store" and isinstance(e.value, OSError)
    finally:
        s3.delete_bucket_policy(Bucket=name)
    assert store.load(tok, FP) == b"kept"
    for k in [o["Key"] for o in s3.list_objects_v2(Bucket=name).get("Contents", [])]:
        s3.delete_object(Bucket=name, Key=k)
    s3.delete_bucket(Bucket=name)  # a bucket deleted under a running store
    with pytest.raises(StoreError, match=f"memory store {bucket}: .* failed"):
        _save(store, Token.new(), b"x")
    other = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # a server that then stops
    other.start()
    host, port = other.get_host_and_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket=name)
    dead = open_store(bucket)
    v = _save(dead, tok, b"kept").version
    other.stop()
    with pytest.raises(StoreError, match=f"memory store {bucket}: .* failed .*error sending request"):
        _save(dead, tok, b"x", expect=v)
    with pytest.raises(StoreError, match="reading"):
        dead.open(tok, FP)

"""`moshi-ttt memory ls|show|rm|gc`: metadata only, never content or key material."""

from __future__ import annotations

import json
import os

from moshi_ttt.apps.commands import main
from moshi_ttt.memory.seal import Token
from moshi_ttt.memory.store import MemoryStore

FP = "a" * 64


def _run(capsys, *args):
    rc = main(["memory", *args])
    return rc, [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_memory_command(tmp_path, capsys):
    store = MemoryStore(tmp_path)
    toks = [Token.new(), Token.new()]
    for t in toks:
        store.save(t, FP, b"private words " * 10, {"frames": 42, "compression": "exact"}, owner="local",
                   expect=None)
    d = ["--memory-store", str(tmp_path)]
    rc, rows = _run(capsys, "ls", *d)
    assert rc == 0 and sorted(r["id"] for r in rows) == sorted(t.id for t in toks)
    for r in rows:
        assert r["frames"] == 42 and r["fingerprint"] == FP and r["bytes"] > 0 and "expires_utc" in r
        assert not {"check", "nonce"} & set(r) and "private" not in json.dumps(r)
    rc, rows = _run(capsys, "show", toks[0].id, *d)
    assert rc == 0 and rows[0]["id"] == toks[0].id
    assert _run(capsys, "show", "0" * 32, *d)[0] == 2
    rc, rows = _run(capsys, "rm", toks[0].id, *d)
    assert rc == 0 and rows == [{"removed": toks[0].id}] and not (tmp_path / f"{toks[0].id}.mem").exists()
    assert _run(capsys, "rm", toks[0].id, *d)[0] == 2 and _run(capsys, "rm", "../etc", *d)[0] == 2
    old = (tmp_path / f"{toks[1].id}.mem")
    os.utime(old, (1, 1))  # saved in 1970: expired
    rc, rows = _run(capsys, "gc", *d)
    assert rc == 0 and rows == [{"removed": [toks[1].id]}] and not old.exists()

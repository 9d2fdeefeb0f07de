"""What does a refused resume cost the store, against an unknown id's? `MemoryStore.open` of a stored memory of
`--mib` MiB with a wrong key, and of an unknown id, each `--repeat` times: bytes read from the backend
(`MemoryStore.bytes_read`) and wall time (median and p90), plus a right key's `open` + `read` for scale.
Prints JSON and writes it to `--out`.

    .venv/bin/python scripts/memory_open_cost.py --out docs/memory_open_cost.json

`--store` a directory (default: a fresh temporary one) or `s3://bucket/prefix` (the AWS environment).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from moshi_ttt.memory.seal import MemoryUnavailable, Token
from moshi_ttt.memory.store import MemoryStore

FP = "f" * 64


def _cost(store: MemoryStore, fn, repeat: int) -> dict:
    times, read = [], []
    for _ in range(repeat):
        before = store.bytes_read
        t0 = time.perf_counter()
        try:
            fn()
        except MemoryUnavailable:
            pass
        times.append(time.perf_counter() - t0)
        read.append(store.bytes_read - before)
    times.sort()
    return {"median_ms": round(1e3 * statistics.median(times), 3),
            "p90_ms": round(1e3 * times[int(0.9 * len(times))], 3), "bytes_read": max(read)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default=None)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = MemoryStore(args.store or tmp, quota_bytes=None)
        tok = Token.new()
        store.save(tok, FP, os.urandom(args.mib << 20), owner="bench", expect=None)
        wrong = Token(tok.id, Token.new().key)
        rows = {"wrong_key": _cost(store, lambda: store.open(wrong, FP), args.repeat),
                "unknown_id": _cost(store, lambda: store.open(Token.new(), FP), args.repeat),
                "right_key_open_and_read": _cost(store, lambda: store.read(store.open(tok, FP)),
                                                 max(3, args.repeat // 50))}
        store.remove(tok.id)
    out = {"store": "s3" if args.store and args.store.startswith("s3://") else "local directory",
           "memory_bytes": args.mib << 20, "repeat": args.repeat, **rows}
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

"""`moshi-ttt memory`: the operator's view of a memory store — `ls`, `show ID` (metadata only: a memory's
content is sealed with its client's key, which the store never holds), `rm ID`, `gc` (expired memories,
old tombstones, orphan owner markers). Prints JSON lines; exit code 2 for an unknown id."""

from __future__ import annotations

import argparse
import json
import time

from moshi_ttt.flags import add_store_args, store_of
from moshi_ttt.memory.seal import MemoryUnavailable


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    sub = parser.add_subparsers(dest="action", required=True)
    for name, help_ in (("ls", "list the stored memories"), ("show", "one memory's metadata"),
                        ("rm", "remove a memory now"), ("gc", "remove expired memories and stale bookkeeping")):
        p = sub.add_parser(name, help=help_)
        if name in ("show", "rm"):
            p.add_argument("id")
        add_store_args(p)


def _line(entry: dict) -> str:
    iso = {k: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry[k])) for k in ("saved", "expires")
           if k in entry}
    return json.dumps(dict(entry, **{f"{k}_utc": v for k, v in iso.items()}), sort_keys=True)


def run(args: argparse.Namespace) -> int:
    store = store_of(args)
    if args.action == "ls":
        for e in store.entries():
            print(_line(e))
    elif args.action == "show":
        try:
            print(_line(store.show(args.id)))
        except KeyError as e:
            print(f"moshi-ttt memory: {e.args[0]}")
            return 2
    elif args.action == "rm":
        try:
            removed = store.remove(args.id)
        except MemoryUnavailable:
            removed = False
        if not removed:
            print(f"moshi-ttt memory: no memory {args.id!r} in {store.where}")
            return 2
        print(json.dumps({"removed": args.id}))
    else:
        print(json.dumps({"removed": store.gc()}))
    return 0

"""`moshi-ttt` command line: one subcommand per module, each exposing `add_args(parser)` and `run(args)`."""

from __future__ import annotations

import argparse
import importlib
import sys

from moshi_ttt.startup import compile_only_on_cuda

# subcommand → module providing add_args / run (imported lazily: torch start-up is slow)
COMMANDS = {
    "bench": ("moshi_ttt.apps.bench", "measure what TTT costs (latency, memory, exactness)"),
    "infer": ("moshi_ttt.apps.infer", "offline WAV → WAV + transcript + TTT telemetry"),
    "memory": ("moshi_ttt.apps.memory_admin", "the conversation-memory store: ls, show, rm, gc"),
    "serve": ("moshi_ttt.server.serve", "real-time full-duplex websocket server"),
    "train": ("moshi_ttt.train.command", "TTT-aware finetuning on conversation audio"),
}


def main(argv: list[str] | None = None) -> int:
    compile_only_on_cuda()  # before any subcommand module imports torch and moshi
    parser = argparse.ArgumentParser(prog="moshi-ttt", description="In-Place Test-Time Training for Moshi")
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    modules = {}
    for name, (modname, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        if name == wanted:
            modules[name] = importlib.import_module(modname)
            modules[name].add_args(p)
    args = parser.parse_args(argv)
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())

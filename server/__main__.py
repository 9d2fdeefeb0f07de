"""`python -m moshi_ttt.server ...` is `moshi-ttt serve ...`, as `python -m moshi.server` is moshi's server."""

import argparse

from moshi_ttt.startup import compile_only_on_cuda


def main() -> int:
    compile_only_on_cuda()  # before .cli imports torch and moshi
    from . import cli

    parser = argparse.ArgumentParser(prog="python -m moshi_ttt.server")
    cli.add_args(parser)
    return cli.run(parser.parse_args())


raise SystemExit(main())

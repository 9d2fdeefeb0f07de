"""`python -m moshi_ttt.server ...` is `moshi-ttt serve ...`, as `python -m moshi.server` is moshi's server."""

import argparse

from moshi_ttt.startup import compile_only_on_cuda


def main() -> int:
    compile_only_on_cuda()  # before .serve imports torch and moshi
    from . import serve

    parser = argparse.ArgumentParser(prog="python -m moshi_ttt.server")
    serve.add_args(parser)
    return serve.run(parser.parse_args())


raise SystemExit(main())

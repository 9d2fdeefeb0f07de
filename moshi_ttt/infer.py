"""`python -m moshi_ttt.infer ...` is `moshi-ttt infer ...` (moshi has `python -m moshi.run_inference`); the
command itself is `moshi_ttt.apps.infer`. Importing this module does nothing."""

if __name__ == "__main__":
    import sys

    from moshi_ttt.apps.commands import main

    raise SystemExit(main(["infer", *sys.argv[1:]]))

"""`python -m moshi_ttt ...` is `moshi-ttt ...`."""

from moshi_ttt.apps.cli import main

raise SystemExit(main())

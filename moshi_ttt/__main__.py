"""`python -m moshi_ttt ...` is `moshi-ttt ...`."""

from moshi_ttt.apps.commands import main

raise SystemExit(main())

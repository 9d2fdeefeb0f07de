"""`python -m moshi_ttt.train CONFIG.yaml` — the entry point for `torchrun --nproc-per-node N -m moshi_ttt.train`."""

from moshi_ttt.train.command import main

raise SystemExit(main())

"""moshi_ttt's log lines on stderr, for the commands that have no logging set-up of their own (infer, train)."""

from __future__ import annotations

import logging
import sys


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of the record (tests capture and restore it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def log_to_stderr(prog: str) -> None:
    """moshi_ttt's info lines (which TTT layers run, checkpoint warnings) as `PROG: level: message` on stderr;
    does nothing when the `moshi_ttt` logger already has a handler."""
    logger = logging.getLogger("moshi_ttt")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(f"{prog}: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)

"""A pytest plugin that records what a run of the suite measured, for the README (`moshi_ttt.docs_gen`):

    MOSHI_TTT_SUITE_RECORD=docs/test_suite.json pytest -p moshi_ttt.testing.suite_record tests

writes {when (UTC), machine, loadavg before/after, markers (-m), passed, failed, skipped, errors, deselected,
seconds (pytest's own wall time)} to that file at the end of the session; without the variable it does nothing.
`make test` and `make test-fast` load it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from moshi_ttt.utils import provenance

ENV = "MOSHI_TTT_SUITE_RECORD"
_state: dict = {}


def pytest_sessionstart(session) -> None:
    _state.update(t0=time.perf_counter(), start=provenance.started())


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    path = os.environ.get(ENV)
    if not path or "t0" not in _state:
        return
    counts = {k: len(terminalreporter.stats.get(k, [])) for k in ("passed", "failed", "skipped", "error",
                                                                  "deselected")}
    seconds = round(time.perf_counter() - _state["t0"], 1)
    record = provenance.finished({"markers": config.getoption("markexpr") or "", **counts,
                                  "exit_status": int(exitstatus), "seconds": seconds}, _state["start"])
    Path(path).write_text(json.dumps(record, indent=1) + "\n")

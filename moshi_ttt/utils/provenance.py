"""When, on what machine and under what load a measurement ran: the fields every measured JSON file records
(`moshi-ttt bench`, the demo training scripts, the measurement scripts, the suite record), read by
`moshi_ttt.docs_gen`. Torch-free.

    start = started()            # {"when": UTC ISO time, "machine": ..., "loadavg": {"before": [1, 5, 15 min]}}
    record = finished(record, start)   # start's fields, "loadavg" with "after", then the record's own
"""

from __future__ import annotations

import datetime
import os
import platform
import typing as tp


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"


def started() -> dict[str, tp.Any]:
    return {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "loadavg": {"before": list(os.getloadavg())}}


def finished(record: dict[str, tp.Any], start: dict[str, tp.Any]) -> dict[str, tp.Any]:
    return {**start, "loadavg": {**start["loadavg"], "after": list(os.getloadavg())}, **record}

"""Starting a thread that reports when it serves: the engine's model thread, `BackgroundServer`'s event loop."""

from __future__ import annotations

import threading
import typing as tp


def start_and_wait(thread: threading.Thread, ready: threading.Event, timeout: float, what: str,
                   failure: tp.Callable[[], BaseException | None]) -> None:
    """Starts `thread` and waits until it sets `ready`; RuntimeError naming `what` if that takes over `timeout`
    seconds, or if `failure()` (read once `ready` is set) is an exception, chained to it."""
    thread.start()
    if not ready.wait(timeout):
        raise RuntimeError(f"{what} did not start within {timeout:.0f} s")
    error = failure()
    if error is not None:
        raise RuntimeError(f"{what} failed to start: {error!r}") from error

"""The one `moshi-ttt serve` subprocess launcher of the tests and of the scripts that probe a server.

    with ServeProcess(workdir, ["--max-conversations", "1"]) as srv:   # `serve --demo --port 0 ...`
        urllib.request.urlopen(srv.url + "/health")
    assert srv.returncode == 0, srv.log_tail()

Invariants: the URL is the one the server prints (`moshi-ttt serve: listening on URL`); stdout is read by a
thread from start to exit (the server never blocks on a full pipe) and stderr goes to `log_path` (emptied by
the first start, appended to by a restart); `stop` always leaves no process behind and returns the exit code
(negative: killed by that signal, e.g. -9 when it ignored `sig` for `timeout` seconds).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal as _signal
import subprocess
import sys
import threading
import typing as tp
from pathlib import Path

LISTENING = re.compile(r"listening on (https?://\S+)")


class ServeError(RuntimeError):
    """The server exited, or printed no listening line in time, before it served."""


class ServeProcess:
    """`COMMAND serve [--demo] [--host HOST] --port PORT --cache-dir CACHE ARGS...` as a subprocess.

    command: the program (default: this interpreter's `python -m moshi_ttt`; e.g. an installed `moshi-ttt`).
    env: the base environment (default os.environ), always with NO_TORCH_COMPILE=1, HF_HUB_OFFLINE=1,
    PYTHONUNBUFFERED=1 and without MOSHI_TTT_API_KEY (keys are passed as flags);
    omp_threads sets OMP_NUM_THREADS. cache_dir None: no --cache-dir flag. Restartable after it exited.
    """

    def __init__(self, workdir: str | Path, args: tp.Sequence[str] = (), *, demo: bool = True,
                 host: str | None = None, port: int = 0, cache_dir: str | Path | None = "cache",
                 command: tp.Sequence[str] | None = None, env: tp.Mapping[str, str] | None = None,
                 omp_threads: int | None = None,
                 log_path: str | Path | None = None, cwd: str | Path | None = None,
                 new_session: bool = False, start_timeout: float = 120.0):
        self.workdir = Path(workdir)
        self.log_path = Path(log_path) if log_path is not None else self.workdir / "serve.log"
        cmd = list(command) if command is not None else [sys.executable, "-m", "moshi_ttt"]
        cmd += ["serve", *(["--demo"] if demo else []), *(["--host", host] if host else []), "--port", str(port)]
        if cache_dir is not None:
            cmd += ["--cache-dir", str(self.workdir / cache_dir)]
        self.argv = cmd + [str(a) for a in args]
        self.env = dict(os.environ if env is None else env, NO_TORCH_COMPILE="1", HF_HUB_OFFLINE="1",
                        PYTHONUNBUFFERED="1")
        self.env.pop("MOSHI_TTT_API_KEY", None)
        if omp_threads is not None:
            self.env["OMP_NUM_THREADS"] = str(omp_threads)
        self.cwd, self.new_session, self.start_timeout = cwd, new_session, start_timeout
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.stdout_lines: list[str] = []
        self._listening = threading.Event()
        self._reader: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> ServeProcess:
        """Launches the process (returns at once; `wait_listening` waits for its URL)."""
        if self.running:
            raise ServeError(f"pid {self.proc.pid} is still running: stop it before starting again")
        self.stop()  # a previous run that exited by itself: its stdout reader and pipe
        self.url = None
        self.stdout_lines = []
        self._listening = threading.Event()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a" if self.proc is not None else "w") as log:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=log, text=True, env=self.env,
                                         cwd=self.cwd, start_new_session=self.new_session)
        self._reader = threading.Thread(target=self._read_stdout, args=(self.proc, self._listening), daemon=True)
        self._reader.start()
        return self

    def _read_stdout(self, proc: subprocess.Popen, listening: threading.Event) -> None:
        for line in proc.stdout:
            self.stdout_lines.append(line)
            m = LISTENING.search(line)
            if m and self.url is None:
                self.url = m.group(1)
                listening.set()
        listening.set()  # EOF: the process is exiting; wait_listening reports it

    def wait_listening(self, timeout: float | None = None) -> str:
        """Waits for the listening line; returns the URL. On exit or timeout: kills it, raises ServeError."""
        timeout = self.start_timeout if timeout is None else timeout
        if self._listening.wait(timeout) and self.url is not None:
            return self.url
        eof = self._listening.is_set()  # stdout closed: the process is exiting
        if eof:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        code = self.stop(_signal.SIGKILL, 10)
        why = f"it exited with code {code}" if eof else f"no listening line within {timeout:g} s, killed"
        raise ServeError(f"`{' '.join(self.argv)}` did not start ({why}); its log {self.log_path}:\n"
                         f"{self.log_tail()}")

    def stop(self, sig: int = _signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Sends `sig` (SIGTERM or SIGINT: a clean shutdown) if it still runs, waits up to `timeout` s, kills
        it after that; returns the exit code (None if never started). Idempotent."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._reader is not None:
            self._reader.join(10)
        self.proc.stdout.close()
        return self.proc.returncode

    def __enter__(self) -> ServeProcess:
        self.start()
        self.wait_listening()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the running process ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def host(self) -> str:
        return self.url.split("//", 1)[1].rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def ws_url(self) -> str:
        """The conversation websocket, /api/chat."""
        return self.url.replace("http", "ws", 1) + "/api/chat"

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        """Popen.wait: the exit code (subprocess.TimeoutExpired after `timeout`)."""
        return self.proc.wait(timeout)

    def log_text(self) -> str:
        """Everything the server wrote to stderr (all runs)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 3000) -> str:
        return self.log_text()[-n:]

"""The resident memory of `moshi-ttt serve`'s web process (the model in its worker process, `--workers 1`):
starts `serve --demo --port 0`, waits until it listens, reads VmRSS of the web process (not its worker) from
/proc, and whether it loaded torch (/proc/PID/maps naming libtorch). Linux only. docs/serving.md has the figure.

    python scripts/web_rss.py [--repeat 3] [extra serve flags]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def _has_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def measure(extra: list[str], settle: float = 2.0, timeout: float = 300.0) -> tuple[float, bool]:
    cmd = [sys.executable, "-m", "moshi_ttt", "serve", "--demo", "--port", "0", *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", NO_TORCH_COMPILE="1")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"serve exited ({p.wait()}) before listening")
            if "listening on" in line:
                break
        time.sleep(settle)
        return _rss_mib(p.pid), _has_torch(p.pid)
    finally:
        p.terminate()
        p.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    args, extra = ap.parse_known_args()
    for _ in range(args.repeat):
        rss, torch = measure(extra)
        print(f"web process VmRSS {rss:.1f} MiB, torch loaded: {torch}", flush=True)


if __name__ == "__main__":
    main()

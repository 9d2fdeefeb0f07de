"""The web process of `serve` never loads torch: the model steps in its worker process (`--workers 1`, the
default), so the web side (pyproject's torch contract) holds a conversation, with memory on, without it;
`--workers 0` (the model in the web process) loads it then. The RSS this saves: docs/serving.md."""

import json
import subprocess
import sys

import pytest

WEB_PROCESS = r"""
import asyncio, json, sys

import aiohttp
import numpy as np

from moshi_ttt.server.serve import BackgroundServer
from moshi_ttt.server.web.client import FRAME, ChatClient

async def converse(srv):
    async with aiohttp.ClientSession() as http:
        c = await ChatClient.connect(http, srv.ws_url, memory=True)
        pcm = (0.1 * np.sin(np.arange(8 * FRAME) * 0.05)).astype(np.float32)
        n = await c.send_pcm(pcm)
        await c.wait_output_frames(n, timeout=60)
        await c.wait_for(lambda: c.memory() is not None, 30, "the memory token")
        await c.close()
        return n

srv = BackgroundServer(sys.argv[1:])
try:
    frames = asyncio.run(converse(srv))
    print(json.dumps({"frames": frames, "slots": srv.engine.n, "torch": "torch" in sys.modules}))
finally:
    srv.stop()
"""


@pytest.mark.parametrize("workers, torch", [("1", False), ("0", True)])
def test_the_web_process_imports_torch_only_with_the_model_in_it(tmp_path, workers, torch):
    argv = ["--demo", "--port", "0", "--cache-dir", str(tmp_path / "cache"), "--max-conversations", "1",
            "--memory-store", str(tmp_path / "memories"), "--no-per-ip-limits", "--workers", workers]
    out = subprocess.run([sys.executable, "-c", WEB_PROCESS, *argv], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"frames": 8, "slots": 1, "torch": torch}, seen

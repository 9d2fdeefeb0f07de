"""Conversation memory through a running server, for the tests: remember a conversation, resume it, and
read what the store holds (decrypted with the client's token, as only its client can)."""

from __future__ import annotations

import typing as tp
from pathlib import Path

import torch
from moshi_ttt.server.web.client import ChatClient

from moshi_ttt.memory.seal import Token, read_header
from moshi_ttt.memory.store import MemoryStore
from moshi_ttt.models import memory_format as mf
from moshi_ttt.models.lm_memory import Memory


def stored(store_dir: str | Path, token: str | Token) -> Memory:
    """The memory that `token` opens in the store folder (its fingerprint read from the stored header);
    `MemoryUnavailable` if it does not open one."""
    store = MemoryStore(store_dir)
    token = Token.parse(token) if isinstance(token, str) else token
    head, _ = read_header(store.path(token.id).read_bytes())
    return mf.loads(store.load(token, head["fingerprint"]))


async def wait_stored(store_dir: str | Path, token: str, frames: int, timeout: float = 15.0) -> Memory:
    """Until the memory `token` opens holds `frames` frames (a conversation's final save, by another process)."""
    import asyncio

    from moshi_ttt.memory.seal import MemoryUnavailable

    last = None
    for _ in range(int(timeout / 0.1)):
        try:
            last = stored(store_dir, token)
            if last.frames == frames:
                return last
        except (MemoryUnavailable, FileNotFoundError):
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"the memory of {token[:8]}… holds {None if last is None else last.frames} frames after "
                         f"{timeout:g} s, expected {frames}")


def drifts(memory: Memory) -> dict[str, float]:
    """‖W − W⁽⁰⁾‖_F per TTT layer (str), as the TTT telemetry reports it."""
    return {str(i): float(torch.linalg.matrix_norm(lm.delta.double())) for i, lm in memory.layers.items()}


def telemetry_drifts(tele: dict) -> dict[str, float]:
    return {layer: v["drift"] for layer, v in tele["layers"].items()}


async def remember(http: tp.Any, url: str, pcm, keep_open: bool = False, **connect) -> tuple[ChatClient, int, dict]:
    """A `?memory=1&telemetry=1` conversation that sends `pcm` and waits for every reply frame and the
    telemetry after the last one; closed unless `keep_open`. Returns (client, frames sent, last telemetry)."""
    c = await ChatClient.connect(http, url, telemetry=True, memory=True, **connect)
    n = await c.send_pcm(pcm)
    await c.wait_output_frames(n, timeout=60)
    await c.wait_for(lambda: any(m["frames"] == n for m in c.ttt()), 10, "telemetry after the last frame")
    if not keep_open:
        await c.close()
    return c, n, [m for m in c.ttt() if m["frames"] == n][-1]


async def resume(http: tp.Any, url: str, token: str, confirm: bool = True, **connect) -> ChatClient:
    """A `?resume=TOKEN&telemetry=1` conversation, once its memory message and first telemetry arrived and (unless
    not `confirm`) its new token is confirmed: the memory is sealed with the new token from then on."""
    c = await ChatClient.connect(http, url, telemetry=True, resume=token, **connect)
    await c.wait_for(lambda: c.memory() is not None and c.ttt(), 10, "the memory message and first telemetry")
    if confirm:
        answer = await c.confirm_memory()
        assert answer.get("confirmed") is True, answer
    return c

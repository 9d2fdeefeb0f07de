"""The HAProxy agent (`agent-check`): a TCP port that answers each connection with one line telling the
balancer this instance's state and capacity, so that no slot count is copied into its config by hand.

  "up maxconn:<slots>\\n"   the model serves: HAProxy sets the server's maxconn to the slot count
  "down\\n"                 the model worker is restarting (as /health's 503)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ..core.engine_api import ServingEngine

log = logging.getLogger("moshi_ttt.server.agent")


def agent_line(engine: ServingEngine) -> bytes:
    return f"up maxconn:{engine.n}\n".encode() if engine.alive else b"down\n"


async def start_agent(engine: ServingEngine, host: str, port: int) -> asyncio.AbstractServer:
    """Listens on (host, port) and answers `agent_line(engine)` to every connection."""

    async def answer(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            writer.write(agent_line(engine))
            await asyncio.wait_for(writer.drain(), 2)
        writer.close()
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 2)

    server = await asyncio.start_server(answer, host, port)
    log.info("HAProxy agent on %s:%d", host, server.sockets[0].getsockname()[1])
    return server

"""The aiohttp application: routes, API-key check, graceful shutdown.

GET /api/chat  websocket, Moshi's protocol (one conversation per connection, see `session`). Refused
               before the upgrade, with no slot claimed: 429 + Retry-After over a per-address limit
               (`admission`); through a trusted proxy also 503 + Retry-After while no slot is free or the
               model worker restarts, so that the balancer retries another instance (a direct client
               is upgraded and gets the 0x05 "server busy": a browser cannot read an HTTP refusal)
               `?telemetry=1`, `?memory=1`, `?resume=TOKEN` (docs/protocol.md); a resume from an address whose
               failed-token budget is spent: 429 (`admission`)
DELETE /api/memory/{id}   with `Authorization: Bearer TOKEN`: 204 (removed), or 404 for any token that does not
               open memory {id}; 429 over the failed-token budget; 503 when the store fails (only with
               --memory-store)
GET /health    JSON liveness / load (200 while the engine runs, 503 otherwise)
GET /metrics   Prometheus text (prometheus_client, see `metrics`)
GET /          the web client (`index.html` of the static directory) and its other files

Middlewares, outermost first: the connection guard (`http_guard`: header deadline, no pipelining),
Host and Origin checks (`access`, 403), the API key (401; on /api/memory only through X-API-Key or
?api_key=, since the Authorization header carries the memory token there).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from moshi_ttt.memory.store import StoreError

from ..core.engine_api import ServingEngine
from ..core.reasons import busy
from ..guards.access import AccessPolicy, key_matches
from ..guards.admission import Admission, AdmissionLimits
from ..guards.http_guard import GUARD, ConnectionGuard, HttpLimits, guard_middleware
from ..memory.memories import Memories
from ..metrics import CONTENT_TYPE, Metrics
from . import protocol
from .session import Session, SessionConfig, peer_of

log = logging.getLogger("moshi_ttt.server.app")

DEFAULT_STATIC = Path(__file__).resolve().parent / "static"
PROTECTED = ("/api/chat", "/metrics")
PROTECTED_PREFIXES = (protocol.MEMORY_PATH,)
API_KEY_HEADER = "X-API-Key"
API_KEY_QUERY = "api_key"


@dataclass
class AppConfig:
    api_key: str | None = None
    static_dir: Path | None = DEFAULT_STATIC
    session: SessionConfig = field(default_factory=SessionConfig)
    info: dict = field(default_factory=dict)  # model description: /health and the 0x04 "info" message
    shutdown_grace: float = 3.0
    access: AccessPolicy = field(default_factory=AccessPolicy)
    http: HttpLimits = field(default_factory=HttpLimits)
    admission: AdmissionLimits = field(default_factory=AdmissionLimits)
    memories: Memories | None = None  # conversation memory (None: off, --memory-store not given)


ENGINE = web.AppKey("engine", ServingEngine)  # remote.WorkerEngine, or engine.Engine with --workers 0
METRICS = web.AppKey("metrics", Metrics)
CONFIG = web.AppKey("config", AppConfig)
SESSIONS = web.AppKey("sessions", set)
ADMISSION = web.AppKey("admission", Admission)


def _key_ok(request: web.Request, key: str, bearer: bool = True) -> bool:
    given = request.headers.get(API_KEY_HEADER) or request.query.get(API_KEY_QUERY)
    if given is None and bearer:
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
    return key_matches(given, key)


@web.middleware
async def _access(request: web.Request, handler):
    policy = request.app[CONFIG].access
    why = policy.host_refusal(request.headers.get("Host"), request.secure)
    if why is None and request.path == "/api/chat":
        why = policy.origin_refusal(request.headers.get("Origin"), request.headers.get("Host"), request.secure)
    if why is not None:
        log.warning("403 for %s %s from %s: %s", request.method, request.path, peer_of(request), why)
        return web.Response(status=403, text=f"403: {why}\n")
    return await handler(request)


@web.middleware
async def _auth(request: web.Request, handler):
    cfg = request.app[CONFIG]
    memory = request.path.startswith(PROTECTED_PREFIXES)
    if cfg.api_key and (request.path in PROTECTED or memory) and not _key_ok(request, cfg.api_key, bearer=not memory):
        request.app[METRICS].inc_unauthorized()
        log.warning("401 for %s %s from %s: missing or wrong API key", request.method, request.path, peer_of(request))
        return web.Response(status=401, text="401: missing or wrong API key (send the X-API-Key header or the "
                                             "api_key query parameter)\n")
    return await handler(request)


async def handle_chat(request: web.Request) -> web.StreamResponse:
    app = request.app
    cfg = app[CONFIG]
    # aiohttp's own limit is a hard backstop (it closes with 1009 and no 0x05); our limit is checked
    # in `protocol.parse`, which sends a 0x05 first.
    # autoping off: the session answers (and budgets) the client's pings itself. compress off: no
    # permessage-deflate, whose inflation a client could make cost far more than the bytes it sent.
    ws = web.WebSocketResponse(max_msg_size=max(16 * cfg.session.max_message_bytes, 1 << 20), autoping=False,
                               compress=False)
    if not ws.can_prepare(request).ok:
        return web.Response(status=400, text="400: /api/chat expects a websocket upgrade\n")
    try:
        telemetry = protocol.telemetry_requested(request.query.get(protocol.TELEMETRY_QUERY))
        remember = protocol.flag_requested(protocol.MEMORY_QUERY, request.query.get(protocol.MEMORY_QUERY))
    except protocol.ProtocolError as e:
        return web.Response(status=400, text=f"400: {e.reason}\n")
    resume = request.query.get(protocol.RESUME_QUERY)
    if (remember or resume is not None) and cfg.memories is None:
        return web.Response(status=400, text="400: conversation memory is off on this server (no --memory-store)\n")
    engine, metrics, admission = app[ENGINE], app[METRICS], app[ADMISSION]
    addr = _client(request)
    if resume is not None:
        refusal = admission.memory_refusal(addr)
        if refusal is not None:
            metrics.rejected_conversation(refusal.label)
            log.warning("resume from %s refused: %s", addr, refusal.reason)
            return _refuse(refusal.status, refusal.reason, refusal.retry_after)
    if admission.proxied(request.remote):
        if not engine.alive:
            metrics.rejected_conversation("unavailable")
            return _refuse(503, "the model is restarting, try again in a few seconds", 5)
        if engine.active_count() >= engine.n:
            metrics.rejected_conversation("busy")
            return _refuse(503, busy(engine.n), 2)
    refusal = admission.refusal(addr)
    if refusal is not None:
        metrics.rejected_conversation(refusal.label)
        log.info("upgrade from %s refused: %s", addr, refusal.reason)
        return _refuse(refusal.status, refusal.reason, refusal.retry_after)
    session = None
    try:
        await ws.prepare(request)
        transport = request.transport
        session = Session(ws, engine, metrics, cfg.session, peer=addr, info=cfg.info,
                          telemetry=telemetry, on_claimed=lambda: app[GUARD].conversation(transport),
                          drop_input=lambda: app[GUARD].drop_input(transport), memories=cfg.memories,
                          remember=remember, resume=resume, on_memory_refused=lambda: admission.memory_failed(addr))
        app[SESSIONS].add(session)
        await session.run()
    finally:
        admission.closed(addr, abusive=session is not None and session.abusive)
        if session is not None:
            app[SESSIONS].discard(session)
    return ws


def _client(request: web.Request) -> str:
    return request.app[ADMISSION].client_address(request.remote,
                                                 ",".join(request.headers.getall("X-Forwarded-For", [])))


async def handle_memory_delete(request: web.Request) -> web.Response:
    """DELETE /api/memory/{id}: the memory is removed at once if the Bearer token opens it."""
    memories, admission = request.app[CONFIG].memories, request.app[ADMISSION]
    addr = _client(request)
    refusal = admission.memory_refusal(addr)
    if refusal is not None:
        log.warning("memory delete from %s refused: %s", addr, refusal.reason)
        return _refuse(refusal.status, refusal.reason, refusal.retry_after)
    auth = request.headers.get("Authorization", "")
    token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    try:
        deleted = memories is not None and await memories.delete(token, request.match_info["id"], addr)
    except StoreError as e:
        request.app[METRICS].inc_memory_failure(e.label)
        log.warning("memory delete from %s failed: %s", addr, e)
        return _refuse(503, "the memory store failed, try again later", 5)
    if deleted:
        return web.Response(status=204)
    admission.memory_failed(addr)
    return web.Response(status=404, text="404: no such memory for this token\n")


def _refuse(status: int, reason: str, retry_after: float) -> web.Response:
    return web.Response(status=status, text=f"{status}: {reason}\n",
                        headers={"Retry-After": str(max(1, math.ceil(retry_after)))})


async def handle_health(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    snap = request.app[METRICS].snapshot()
    ok = engine.alive
    body = {"status": "ok" if ok else "error", "active": engine.active_count(), "max_conversations": engine.n,
            "free": engine.n - engine.active_count(), "steps": snap["steps_total"],
            "realtime_speed": snap["realtime_speed"], **request.app[CONFIG].info}
    return web.json_response(body, status=200 if ok else 503)


async def handle_metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE})


async def _on_shutdown(app: web.Application) -> None:
    sessions = list(app[SESSIONS])
    if not sessions:
        return
    log.info("shutting down: ending %d conversation(s)", len(sessions))
    for s in sessions:
        s.shutdown()
    cfg = app[CONFIG]
    # a remembered conversation's final save runs before its session ends: bounded by the memory timeout
    grace = cfg.shutdown_grace + (cfg.memories.cfg.timeout if cfg.memories is not None else 0.0)
    deadline = asyncio.get_running_loop().time() + grace
    while app[SESSIONS] and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)


async def _collect_memories(app: web.Application) -> tp.AsyncIterator[None]:
    """While the app runs: the store's periodic collection of expired memories (`Memories.collect_forever`)."""
    task = asyncio.create_task(app[CONFIG].memories.collect_forever(), name="memory-gc")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def create_app(engine: ServingEngine, metrics: Metrics, cfg: AppConfig) -> web.Application:
    app = web.Application(middlewares=[guard_middleware, _access, _auth])
    admission = Admission(cfg.admission)
    app[GUARD] = ConnectionGuard(cfg.http, on_refused=metrics.inc_http_refused, banned=admission.banned,
                                 trusted=admission.proxied)
    app[ENGINE] = engine
    app[METRICS] = metrics
    app[CONFIG] = cfg
    app[SESSIONS] = set()
    app[ADMISSION] = admission
    app.router.add_get("/api/chat", handle_chat)
    app.router.add_get("/health", handle_health)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_delete(protocol.MEMORY_PATH + "{id}", handle_memory_delete)
    static = cfg.static_dir
    if static is not None:
        static = Path(static)
        index = static / "index.html"
        if not index.is_file():
            raise FileNotFoundError(f"--static {static}: no index.html there")

        async def handle_root(_: web.Request) -> web.FileResponse:
            return web.FileResponse(index)

        app.router.add_get("/", handle_root)
        app.router.add_static("/", path=str(static), follow_symlinks=False, name="static")
    app.on_shutdown.append(_on_shutdown)
    if cfg.memories is not None and cfg.memories.cfg.gc_every > 0:
        app.cleanup_ctx.append(_collect_memories)
    return app

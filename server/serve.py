"""`moshi-ttt serve`: flags, model loading (a Kyutai checkpoint + TTT, or the offline `--demo`), startup.

`add_args(parser)` and `run(args)` are what `moshi_ttt.apps.commands` calls. `serve_config(args)` turns the parsed
flags into the one `ServeConfig` every part of the server reads; `start(config)` (async) returns a running server
(tests use it with `--port 0`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal
import ssl
import sys
import threading
import typing as tp
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from moshi_ttt.flags import CONTEXT_HELP, CheckpointFlags, add_checkpoint_args, add_store_args, store_of
from moshi_ttt.ttt.config import STATE_DTYPES
from moshi_ttt.utils.cache import cache_dir

from .core.config import LOG_LEVELS, WORKERS, ServeConfig
from .core.engine_api import ServingEngine
from .core.threads import start_and_wait
from .guards import admission, limits
from .guards.access import API_KEY_ENV, AccessPolicy, is_loopback_host, resolve_api_key
from .guards.http_guard import GuardedSite, HttpLimits
from .link.remote import WorkerEngine
from .memory.memories import DEFAULT_GC_EVERY, DEFAULT_MAX_LOADS, DEFAULT_SAVE_EVERY, Memories, MemoryConfig
from .metrics import Metrics
from .web import protocol
from .web.agent import start_agent
from .web.app import DEFAULT_STATIC, GUARD, AppConfig, create_app
from .web.session import SessionConfig

log = logging.getLogger("moshi_ttt.server")

# The event loop and the model thread share the GIL: Python's default switch interval is kept (why:
# docs/design.md, "Serving engine"; the flood figures: docs/serving.md).
DEFAULT_SWITCH_MS = 5.0


NO_LIMIT = "; 0 = no limit"


def _number(g, flag: str, default: float, help: str, after: str = "", kind: type | None = None) -> None:
    """A numeric flag of type `kind` (default: its `default`'s, int or float), whose help ends with the default:
    `HELP (default DEFAULT AFTER)`."""
    g.add_argument(flag, type=kind or type(default), default=default,
                   help=f"{help + ' ' if help else ''}(default {default:g}{after})")


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("network (as moshi.server)")
    g.add_argument("--host", default="localhost", help="interface to bind (default localhost)")
    g.add_argument("--port", type=int, default=8998, help="port (default 8998; 0 = any free port)")
    g.add_argument("--ssl", metavar="DIR", help="serve https/wss with DIR/cert.pem and DIR/key.pem")
    g.add_argument("--static", metavar="DIR",
                   help="web client folder served at / (default: the bundled page; 'none' to disable)")
    g.add_argument("--api-key", default=None,
                   help="require this key (header X-API-Key or query ?api_key=) on /api/chat and /metrics; "
                        f"default ${API_KEY_ENV}. Visible to other local users in the process list: prefer "
                        "--api-key-file or the environment variable")
    g.add_argument("--api-key-file", metavar="PATH", default=None,
                   help="read the API key from this file (surrounding whitespace stripped)")
    g.add_argument("--allowed-origins", nargs="+", action="extend", default=[], metavar="ORIGIN",
                   help="websocket Origins accepted besides the server's own (e.g. https://chat.example.com); "
                        "their hosts are also accepted as Host names on a loopback bind (reverse proxy)")

    g = p.add_argument_group("limits (see docs/serving.md, Exposing the server)")
    _number(g, "--max-delay", SessionConfig.max_delay,
            "seconds of a conversation's audio that may wait for the model before it is ended")
    _number(g, "--admit-lag", SessionConfig.admit_lag, "while the model is slower than real time, refuse new "
            "conversations once some conversation's audio has waited this many seconds")
    _number(g, "--max-messages-per-s", limits.DEFAULT_MESSAGES_PER_S, "per-connection message budget",
            f"/s, burst {limits.DEFAULT_BURST_S:g} s of it")
    _number(g, "--max-bytes-per-s", limits.DEFAULT_BYTES_PER_S, "per-connection byte budget", "/s", kind=float)
    _number(g, "--max-pings-per-s", limits.DEFAULT_PINGS_PER_S, "per-connection websocket ping/pong budget", "/s")
    _number(g, "--header-timeout", HttpLimits.header_timeout,
            "seconds a new connection has to send its request headers")
    _number(g, "--keepalive-timeout", HttpLimits.keepalive_timeout, "idle seconds of a keep-alive HTTP connection")
    _number(g, "--max-pending-connections", HttpLimits.max_pending,
            "concurrent connections that are not a running conversation")
    _number(g, "--max-pending-per-ip", HttpLimits.max_pending_per_ip,
            "of those, per client address (an IPv6 /64 is one address)")
    g.add_argument("--gil-switch-ms", type=float, default=DEFAULT_SWITCH_MS,
                   help="Python's thread switch interval while serving (default "
                        f"{DEFAULT_SWITCH_MS:g} ms): how long the model thread may wait for the GIL")
    g.add_argument("--step-delay-ms", type=float, default=0.0, help=argparse.SUPPRESS)  # tests: a slower model
    g.add_argument("--fail-step", type=int, default=0, help=argparse.SUPPRESS)  # tests: this step raises

    g = p.add_argument_group("admission per client address (see docs/serving.md)")
    _number(g, "--max-conversations-per-ip", admission.DEFAULT_MAX_PER_IP, "open conversations per client address",
            NO_LIMIT)
    _number(g, "--max-starts-per-minute", admission.DEFAULT_STARTS_PER_MINUTE,
            "conversation starts per client address and minute", NO_LIMIT)
    _number(g, "--start-burst", admission.DEFAULT_START_BURST, "starts an address may make at once")
    _number(g, "--ban-after", admission.DEFAULT_BAN_AFTER, "refuse an address at the upgrade once its conversations "
            "were cut for abuse this many times within --ban-window", "; 0 = never")
    _number(g, "--ban-window", admission.DEFAULT_BAN_WINDOW_S, "seconds")
    _number(g, "--ban-seconds", admission.DEFAULT_BAN_S, "how long such an address is refused")
    g.add_argument("--trusted-proxies", nargs="+", action="extend", default=[], metavar="ADDR",
                   help="reverse proxies (addresses or networks) whose X-Forwarded-For names the client; from "
                        "anyone else the header is ignored")
    g.add_argument("--agent-port", type=int, default=None, metavar="PORT",
                   help="answer HAProxy's agent-check on this TCP port (same host): 'up maxconn:<slots>', or "
                        "'down' while the model worker restarts")
    g.add_argument("--no-per-ip-limits", action="store_true",
                   help="turn every per-address limit off (a trusted network; tests)")

    g = p.add_argument_group("model (as moshi.server)")
    add_checkpoint_args(g, demo_help="no checkpoint: build the tiny echo TTT-Moshi + reduced Mimi + tokenizer "
                                     "(shipped weights) in the cache and serve it, fully offline: you hear "
                                     "yourself ≈ 0.9 s later (a pipeline test, not a conversation)")
    g.add_argument("--no-fuse-lora", action="store_false", dest="fuse_lora", help="keep LoRA layers unfused")
    g.add_argument("--context", type=int, default=None, metavar="FRAMES", help=CONTEXT_HELP)
    g.add_argument("--cfg-coef", type=float, default=1.0, help="classifier-free guidance coefficient")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    g.add_argument("--half", action="store_true", help="float16 instead of bfloat16 (CUDA); CPU runs float32")
    g.add_argument("--ttt-state-dtype", choices=STATE_DTYPES, default=None,
                   help="dtype of the per-conversation TTT fast weight (default: the TTT config's, float32); "
                        "bfloat16 holds one bf16 copy instead of fp32 + bf16 (docs/capacity.md)")
    g.add_argument("--cache-dir", default=None,
                   help="where --demo keeps its checkpoint (default $MOSHI_TTT_CACHE or ~/.cache/moshi_ttt)")

    g = p.add_argument_group("generation")
    g.add_argument("--temp", type=float, default=None, help="audio temperature (0 = greedy; default 0.8 or the "
                                                           "checkpoint's lm_gen_config)")
    g.add_argument("--temp-text", type=float, default=None, help="text temperature (0 = greedy; default 0.7)")
    g.add_argument("--top-k", type=int, default=None, help="audio top-k (default 250)")
    g.add_argument("--top-k-text", type=int, default=None, help="text top-k (default 25)")
    g.add_argument("--seed", type=int, default=42424242, help="random seed (sampling)")

    g = p.add_argument_group("serving")
    g.add_argument("--max-conversations", type=int, default=4,
                   help="concurrent conversations = batch size of the one shared model (default 4)")
    g.add_argument("--idle-timeout", type=float, default=10.0,
                   help="end a conversation after this many seconds without audio (0 = never; default 10)")
    g.add_argument("--max-message-bytes", type=int, default=protocol.DEFAULT_MAX_MESSAGE_BYTES,
                   help=f"largest client message accepted (default {protocol.DEFAULT_MAX_MESSAGE_BYTES})")
    g.add_argument("--batch-wait-ms", type=float, default=80.0,
                   help="how long a frame may wait for the other streaming conversations' frames so they "
                        "share one batched step (default 80 = one frame)")
    g.add_argument("--telemetry-interval", type=float, default=1.0,
                   help="seconds between TTT telemetry reads / 0x04 messages (0 = only at start; default 1)")
    g.add_argument("--workers", type=int, default=1, choices=WORKERS,
                   help="1 (default): the model steps in its own process (no client can stall it through the "
                        "GIL; a crash of the model is survived); 0: in the web process (debugging only)")
    g.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads for the model thread (0 = auto: cores - 1, at least 1)")
    g.add_argument("--log-level", default="info", choices=LOG_LEVELS)

    g = p.add_argument_group("conversation memory (?memory=1, ?resume=TOKEN; docs/protocol.md, docs/memory.md)")
    add_store_args(g, required=False)
    g.add_argument("--memory-save-every", type=int, default=DEFAULT_SAVE_EVERY,
                   help=f"checkpoint a remembered conversation every N chunks (default {DEFAULT_SAVE_EVERY}; 0 = only "
                        "when it ends)")
    g.add_argument("--memory-format", default="exact", help="exact (default), bf16 or rank:R (lossy)")
    _number(g, "--memory-max-loads", DEFAULT_MAX_LOADS, "memories read and unsealed at once for resumes (each up "
            "to the size of a memory)")
    _number(g, "--memory-gc-every", DEFAULT_GC_EVERY, "seconds between two removals of expired memories from the "
            "store", " s; 0 = never: run `moshi-ttt memory gc`")
    _number(g, "--memory-failures-per-minute", admission.DEFAULT_MEMORY_FAILURES_PER_MINUTE,
            "failed memory resumes + deletes an address may make per minute", NO_LIMIT)
    _number(g, "--memory-failure-burst", admission.DEFAULT_MEMORY_FAILURE_BURST, "")


# -- serving ----------------------------------------------------------------------------------------


@dataclass
class RunningServer:
    runner: web.AppRunner
    engine: ServingEngine  # WorkerEngine, or Engine with --workers 0
    metrics: Metrics
    host: str
    port: int
    scheme: str

    @property
    def url(self) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return ("wss" if self.scheme == "https" else "ws") + self.url[len(self.scheme):] + "/api/chat"

    switch_interval: float | None = None  # sys.getswitchinterval() before start (restored by close)
    agent: asyncio.AbstractServer | None = None  # the HAProxy agent port (--agent-port)

    async def close(self) -> None:
        try:
            if self.agent is not None:
                self.agent.close()
            await self.runner.cleanup()
        finally:
            await self.engine.close()
            if self.switch_interval is not None:
                sys.setswitchinterval(self.switch_interval)


def _ssl_context(folder: str | None) -> ssl.SSLContext | None:
    if folder is None:
        return None
    cert, key = Path(folder) / "cert.pem", Path(folder) / "key.pem"
    missing = [str(p) for p in (cert, key) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"--ssl {folder}: missing {', '.join(missing)}")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    return ctx


# the ServeConfig fields that serve_config resolves, rather than copies from the flag of the same name
_RESOLVED = frozenset({"checkpoint", "memory_store", "memory_store_default", "allowed_origins", "trusted_proxies"})


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The `ServeConfig` of the parsed flags (ValueError naming a bad flag and its value): the checkpoint flags as
    one `CheckpointFlags`, the lists as tuples, and `--demo` keeping its memories in the cache unless
    --memory-store is given."""
    store, store_default = args.memory_store, False
    if store is None and args.demo:
        store, store_default = str(Path(args.cache_dir or cache_dir()) / "memories"), True
    same = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig) if f.name not in _RESOLVED}
    return ServeConfig(**same, checkpoint=CheckpointFlags.from_args(args), memory_store=store,
                       memory_store_default=store_default, allowed_origins=tuple(args.allowed_origins),
                       trusted_proxies=tuple(args.trusted_proxies))


def _in_process_model() -> tp.Any:
    """`--workers 0`: the model side (`build_engine`), imported only then: it loads torch into the web process, which
    `--workers 1` keeps out of it (the model steps in the worker process)."""
    from .step import build_engine

    return build_engine


def _static_dir(flag: str | None) -> Path | None:
    """--static: None, the bundled page; "none", no page; else the folder."""
    if flag is None:
        return DEFAULT_STATIC
    return None if flag.lower() == "none" else Path(flag)


def _admission(cfg: ServeConfig) -> admission.AdmissionLimits:
    trusted = admission.parse_networks(cfg.trusted_proxies)
    if cfg.no_per_ip_limits:
        return dataclasses.replace(admission.AdmissionLimits.off(), trusted_proxies=trusted)
    return admission.AdmissionLimits(
        max_per_ip=cfg.max_conversations_per_ip, starts_per_minute=cfg.max_starts_per_minute,
        start_burst=cfg.start_burst, ban_after=cfg.ban_after, ban_window=cfg.ban_window,
        ban_seconds=cfg.ban_seconds, trusted_proxies=trusted,
        memory_failures_per_minute=cfg.memory_failures_per_minute, memory_failure_burst=cfg.memory_failure_burst)


async def _start_engine(cfg: ServeConfig) -> tuple[ServingEngine, tp.Any, dict]:
    """The engine (the worker's proxy, or with `--workers 0` the in-process Engine), its metrics and model info."""
    if cfg.workers == 0:
        loaded = await asyncio.to_thread(_in_process_model().load, cfg)
        return loaded.engine, loaded.metrics, loaded.info
    worker = WorkerEngine(cfg)
    await worker.start()  # closes itself if it fails
    return worker, worker.metrics, worker.info


def _memories(cfg: ServeConfig, engine: ServingEngine, metrics: tp.Any, info: dict) -> tuple[Memories | None, dict]:
    """Conversation memory when the store is set and the model can keep one, and the info that says so."""
    if not cfg.memory_store or engine.memory_fingerprint is None:
        return None, info
    chunk = int(info.get("ttt", {}).get("layer", {}).get("chunk_size", 1))
    memories = Memories(store_of(cfg), engine.memory_fingerprint, metrics,
                        MemoryConfig(save_every=cfg.memory_save_every, chunk_size=chunk,
                                     max_loads=cfg.memory_max_loads, gc_every=cfg.memory_gc_every))
    log.info("conversation memory on: store %s, format %s, checkpoint every %d chunks", cfg.memory_store,
             cfg.memory_format, cfg.memory_save_every)
    return memories, dict(info, memory={"format": cfg.memory_format, "save_every_chunks": cfg.memory_save_every,
                                        "ttl_days": cfg.memory_ttl})  # /health and the 0x04 info: clients see it


async def start(cfg: ServeConfig) -> RunningServer:
    """Loads the model, starts the engine and the HTTP server; returns once it accepts connections. On a failure
    after the engine started, the engine is closed before the error is raised."""
    ssl_ctx = _ssl_context(cfg.ssl)
    static = _static_dir(cfg.static)
    api_key = resolve_api_key(cfg.api_key, cfg.api_key_file)
    access = AccessPolicy.from_flags(cfg.allowed_origins, cfg.host)
    budget = limits.Budget(cfg.max_messages_per_s, cfg.max_bytes_per_s, cfg.max_pings_per_s)
    http = HttpLimits(header_timeout=cfg.header_timeout, keepalive_timeout=cfg.keepalive_timeout,
                      max_pending=cfg.max_pending_connections, max_pending_per_ip=cfg.max_pending_per_ip)
    per_ip = _admission(cfg)
    if api_key is None and not is_loopback_host(cfg.host):
        log.warning("WARNING: serving on %s, which is not a loopback address, WITHOUT an API key: anyone who "
                    "can reach this port can hold the conversation slots (set --api-key-file or $%s, and put "
                    "a reverse proxy with TLS in front)", cfg.host, API_KEY_ENV)
    engine, metrics, info = await _start_engine(cfg)
    switch = sys.getswitchinterval()
    try:
        memories, info = _memories(cfg, engine, metrics, info)
        app_cfg = AppConfig(api_key=api_key, static_dir=static, memories=memories,
                            session=SessionConfig(idle_timeout=cfg.idle_timeout,
                                                  max_message_bytes=cfg.max_message_bytes, max_delay=cfg.max_delay,
                                                  admit_lag=cfg.admit_lag, budget=budget),
                            info=info, access=access, http=http, admission=per_ip)
        app = create_app(engine, metrics, app_cfg)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, **http.handler_kwargs())
        await runner.setup()
        site = GuardedSite(runner, cfg.host, cfg.port, app[GUARD], ssl_context=ssl_ctx)
        await site.start()
        agent = None if cfg.agent_port is None else await start_agent(engine, cfg.host, cfg.agent_port)
    except BaseException:
        await engine.close()
        raise
    sys.setswitchinterval(cfg.gil_switch_ms / 1000)
    running = RunningServer(runner, engine, metrics, cfg.host, site.port,
                            "https" if ssl_ctx else "http", switch_interval=switch, agent=agent)
    log.info("listening on %s (websocket %s, %d conversation slots%s)", running.url, running.ws_url,
             engine.n, ", API key required" if app_cfg.api_key else "")
    return running


async def _serve_forever(cfg: ServeConfig) -> int:
    server = await start(cfg)
    print(f"moshi-ttt serve: listening on {server.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        await server.close()
    return 0


class BackgroundServer:
    """A server running on its own event loop in a daemon thread (tests, benchmarks, notebooks).

        srv = BackgroundServer(["--demo", "--port", "0"]); ...; srv.stop()
    """

    def __init__(self, argv: tp.Sequence[str], timeout: float = 120.0):
        p = argparse.ArgumentParser(prog="moshi-ttt serve")
        add_args(p)
        self.config = serve_config(p.parse_args(list(argv)))
        # an in-process engine sets torch's process-wide thread count; stop() puts it back
        self._restore_threads = _in_process_model().torch_threads_restorer() if self.config.workers == 0 else None
        self.loop = asyncio.new_event_loop()
        self.server: RunningServer | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="moshi-ttt-server", daemon=True)
        start_and_wait(self._thread, self._ready, timeout, "server", lambda: self._error)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.server = self.loop.run_until_complete(start(self.config))
        except BaseException as e:  # surfaced in __init__
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    @property
    def ws_url(self) -> str:
        assert self.server is not None
        return self.server.ws_url

    @property
    def engine(self) -> ServingEngine:
        assert self.server is not None
        return self.server.engine

    @property
    def thread_ident(self) -> int | None:
        """The event loop thread's ident (profilers sample its stacks)."""
        return self._thread.ident

    def stop(self, timeout: float = 30.0) -> None:
        if self.server is not None and self.loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(self.server.close(), self.loop)
            with contextlib.suppress(Exception):
                fut.result(timeout)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()
        if self._restore_threads is not None:
            self._restore_threads()


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run(args) -> int:
    setup_logging(args.log_level)
    try:
        return asyncio.run(_serve_forever(serve_config(args)))
    except KeyboardInterrupt:
        return 0
    except (FileNotFoundError, ValueError, OSError) as e:
        log.error("%s", e)
        return 2


def main(argv: tp.Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moshi-ttt serve", description=__doc__)
    add_args(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

"""`moshi-ttt serve`: flags, model loading (a Kyutai checkpoint + TTT, or the offline `--demo`), startup.

`add_args(parser)` and `run(args)` are what `moshi_ttt.cli` calls. `start(args)` (async) returns a
running server (tests use it with `--port 0`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import ssl
import sys
import tempfile
import threading
import time
import typing as tp
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from moshi_ttt.config_files import add_checkpoint_args, load_ttt_config

from . import protocol
from .app import DEFAULT_STATIC, AppConfig, create_app
from .engine import Engine, EngineConfig
from .metrics import Metrics
from .session import SessionConfig

log = logging.getLogger("moshi_ttt.server")

DEMO_VERSION = 3  # bump when the demo checkpoint recipe changes (invalidates the cache)


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("network (as moshi.server)")
    g.add_argument("--host", default="localhost", help="interface to bind (default localhost)")
    g.add_argument("--port", type=int, default=8998, help="port (default 8998; 0 = any free port)")
    g.add_argument("--ssl", metavar="DIR", help="serve https/wss with DIR/cert.pem and DIR/key.pem")
    g.add_argument("--static", metavar="DIR",
                   help="web client folder served at / (default: the bundled page; 'none' to disable)")
    g.add_argument("--api-key", default=os.environ.get("MOSHI_TTT_API_KEY"),
                   help="require this key (header X-API-Key or query ?api_key=) on /api/chat and /metrics; "
                        "default $MOSHI_TTT_API_KEY")

    g = p.add_argument_group("model (as moshi.server)")
    add_checkpoint_args(g)
    g.add_argument("--no-fuse-lora", action="store_false", dest="fuse_lora", help="keep LoRA layers unfused")
    g.add_argument("--cfg-coef", type=float, default=1.0, help="classifier-free guidance coefficient")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    g.add_argument("--half", action="store_true", help="float16 instead of bfloat16 (CUDA); CPU runs float32")
    g.add_argument("--demo", action="store_true",
                   help="no checkpoint: build the tiny random TTT-Moshi + reduced Mimi + tokenizer in the cache "
                        "and serve it, fully offline (its speech is not meaningful)")
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
    g.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads for the model thread (0 = auto: cores - 1, at least 1)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


# -- model ------------------------------------------------------------------------------------------


def _cache_root(args) -> Path:
    root = args.cache_dir or os.environ.get("MOSHI_TTT_CACHE") or Path.home() / ".cache" / "moshi_ttt"
    return Path(root)


def demo_repo(cache_root: Path, ttt=None) -> Path:
    """The `--demo` checkpoint folder, built once per TTT config (deterministic, ~1 s) and cached."""
    from moshi_ttt.assets import make_local_repo

    key = json.dumps({"v": DEMO_VERSION, "config": "tiny", "ttt": None if ttt is None else ttt.to_dict()},
                     sort_keys=True)
    folder = cache_root / f"demo-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    if (folder / "config.json").exists():
        return folder
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=cache_root))
    try:
        make_local_repo(tmp, config="tiny", ttt=ttt)
        try:
            os.replace(tmp, folder)
        except OSError:  # built concurrently by another process: keep theirs
            if not (folder / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("built the demo checkpoint in %s", folder)
    return folder


@dataclass
class Loaded:
    engine: Engine
    metrics: Metrics
    info: dict


def load(args) -> Loaded:
    """Loads the model described by the flags and starts the engine (blocking; seconds)."""
    import numpy as np
    import torch
    from moshi.run_inference import get_condition_tensors

    from moshi_ttt.checkpoint import checkpoint_info, load_ttt_moshi

    random.seed(args.seed)
    np.random.seed(args.seed % (2 ** 32))
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        dtype = torch.float16 if args.half else torch.bfloat16
    else:
        dtype = torch.float32
        if args.half:
            log.info("--half is ignored on CPU (float32)")
    ttt_cfg = load_ttt_config(args.ttt_config) if args.ttt_config else None
    if args.demo:
        clash = [f for f in ("hf_repo", "moshi_weight", "mimi_weight", "tokenizer", "config_path", "lora_weight")
                 if getattr(args, f)]
        if clash:
            raise ValueError("--demo builds its own checkpoint; drop " + ", ".join("--" + f.replace("_", "-")
                                                                                  for f in clash))
        repo = demo_repo(_cache_root(args), ttt_cfg)
        info = checkpoint_info(str(repo))
        model_name = f"demo (tiny random TTT-Moshi, {repo})"
        ttt_cfg = None  # it is the checkpoint's own now
    else:
        info = checkpoint_info(args.hf_repo, moshi_weight=args.moshi_weight, mimi_weight=args.mimi_weight,
                               tokenizer=args.tokenizer, config_path=args.config_path, lora_weight=args.lora_weight)
        model_name = args.hf_repo or "moshi default repo"
    t = time.perf_counter()
    lm = load_ttt_moshi(info, ttt_config=ttt_cfg, ttt_weights=args.ttt_weights, device=device, dtype=dtype,
                        fuse_lora=args.fuse_lora)
    mimi = info.get_mimi(device=device)
    tokenizer = info.get_text_tokenizer()
    log.info("loaded %s on %s/%s in %.1f s (TTT layers %s)", model_name, device, str(dtype).replace("torch.", ""),
             time.perf_counter() - t, lm.ttt_layer_indices)

    gen = {"temp": 0.8, "temp_text": 0.7, "top_k": 250, "top_k_text": 25}
    gen.update({k: v for k, v in (info.lm_gen_config or {}).items()})
    for k in ("temp", "temp_text", "top_k", "top_k_text"):
        v = getattr(args, k)
        if v is not None:
            gen[k] = v
    if gen.get("temp", 1) <= 0 and gen.get("temp_text", 1) <= 0:
        gen["use_sampling"] = False
    if args.cfg_coef != 1.0 and lm.fuser is None and not (gen.get("cfg_is_masked_until") or gen.get("cfg_is_no_text")):
        raise ValueError(f"--cfg-coef {args.cfg_coef} needs a conditioned model; this checkpoint has no condition "
                         "fuser (use --cfg-coef 1)")
    n = args.max_conversations
    condition_tensors = get_condition_tensors(info.model_type, lm, batch_size=n, cfg_coef=args.cfg_coef)
    threads = args.threads
    if threads <= 0:
        threads = max(1, (os.cpu_count() or 2) - 1) if device.type == "cpu" else 1
    metrics = Metrics(max_conversations=n, frame_seconds=1 / mimi.frame_rate)
    metrics.set_ttt_layers(lm.ttt_layer_indices)
    engine = Engine(mimi, lm, tokenizer,
                    EngineConfig(max_conversations=n, threads=threads, batch_wait=args.batch_wait_ms / 1000,
                                 telemetry_interval=args.telemetry_interval),
                    metrics=metrics, lm_gen_kwargs=gen, cfg_coef=args.cfg_coef,
                    condition_tensors=condition_tensors or None, device=device)
    engine.start()
    model_info = {
        "model": model_name, "demo": bool(args.demo), "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "max_conversations": n, "sample_rate": int(mimi.sample_rate), "frame_rate": float(mimi.frame_rate),
        "ttt_layers": list(lm.ttt_layer_indices), "ttt": lm.ttt_config.to_dict(),
        "generation": {k: v for k, v in gen.items()}, "cfg_coef": args.cfg_coef,
    }
    return Loaded(engine, metrics, model_info)


# -- serving ----------------------------------------------------------------------------------------


@dataclass
class RunningServer:
    runner: web.AppRunner
    engine: Engine
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

    async def close(self) -> None:
        try:
            await self.runner.cleanup()
        finally:
            await asyncio.to_thread(self.engine.close)


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


async def start(args) -> RunningServer:
    """Loads the model, starts the engine and the HTTP server; returns once it accepts connections."""
    ssl_ctx = _ssl_context(args.ssl)
    if args.static is None:
        static = DEFAULT_STATIC
    elif args.static.lower() == "none":
        static = None
    else:
        static = Path(args.static)
    if args.max_conversations < 1:
        raise ValueError(f"--max-conversations must be >= 1, got {args.max_conversations}")
    if args.max_message_bytes < 1024:
        raise ValueError(f"--max-message-bytes must be >= 1024, got {args.max_message_bytes}")
    loaded = await asyncio.to_thread(load, args)
    cfg = AppConfig(api_key=args.api_key or None, static_dir=static,
                    session=SessionConfig(idle_timeout=args.idle_timeout, max_message_bytes=args.max_message_bytes),
                    info=loaded.info)
    try:
        app = create_app(loaded.engine, loaded.metrics, cfg)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port, ssl_context=ssl_ctx)
        await site.start()
    except BaseException:
        loaded.engine.close()
        raise
    port = args.port
    server = getattr(site, "_server", None)
    if server is not None and server.sockets:
        port = server.sockets[0].getsockname()[1]
    running = RunningServer(runner, loaded.engine, loaded.metrics, args.host, port,
                            "https" if ssl_ctx else "http")
    log.info("listening on %s (websocket %s, %d conversation slots%s)", running.url, running.ws_url,
             loaded.engine.n, ", API key required" if cfg.api_key else "")
    return running


async def _serve_forever(args) -> int:
    server = await start(args)
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
        import torch

        p = argparse.ArgumentParser(prog="moshi-ttt serve")
        add_args(p)
        self.args = p.parse_args(list(argv))
        self._torch_threads = torch.get_num_threads()  # the engine sets the process-wide value; restored by stop()
        self.loop = asyncio.new_event_loop()
        self.server: RunningServer | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="moshi-ttt-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"server did not start within {timeout:.0f} s")
        if self._error is not None:
            raise RuntimeError(f"server failed to start: {self._error}") from self._error

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.server = self.loop.run_until_complete(start(self.args))
        except BaseException as e:  # noqa: BLE001 — surfaced in __init__
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
    def engine(self) -> Engine:
        assert self.server is not None
        return self.server.engine

    def stop(self, timeout: float = 30.0) -> None:
        if self.server is not None and self.loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(self.server.close(), self.loop)
            with contextlib.suppress(Exception):
                fut.result(timeout)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()
        import torch

        torch.set_num_threads(self._torch_threads)


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run(args) -> int:
    setup_logging(args.log_level)
    try:
        return asyncio.run(_serve_forever(args))
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

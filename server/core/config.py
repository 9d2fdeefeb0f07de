"""`ServeConfig`: everything `moshi-ttt serve` was asked for, validated once. `serve.serve_config` builds it from
the parsed flags (resolving their defaults, e.g. `--demo`'s memory store in the cache); the web process and the
model worker (it is pickled to it) read only this. Every invalid value raises a ValueError naming the flag and
the value (`--max-delay must be > 0 seconds, got 0.0`), at construction. The defaults are the flags' own
(`serve.add_args`): a ServeConfig has none, so that each default has one owner."""

from __future__ import annotations

import dataclasses

from moshi_ttt.flags import CheckpointFlags
from moshi_ttt.memory.compression import Compression
from moshi_ttt.ttt.config import STATE_DTYPES
from moshi_ttt.utils.validate import Checks, InvalidFlag

_check = Checks("serve flags", InvalidFlag)
_bad, _num = _check.error, _check.number

WORKERS = (0, 1)
LOG_LEVELS = ("debug", "info", "warning", "error")
MIN_MESSAGE_BYTES = 1024
MAX_GIL_SWITCH_MS = 100
MAX_PORT = 65535


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """The serve flags (same names, `--max-delay` → `max_delay`; their help: `moshi-ttt serve --help`), with the
    checkpoint flags as one `CheckpointFlags` and the lists as tuples."""

    # network
    host: str
    port: int  # 0: any free port
    ssl: str | None  # folder of cert.pem and key.pem
    static: str | None  # web client folder; None: the bundled page; "none": no page
    api_key: str | None
    api_key_file: str | None
    allowed_origins: tuple[str, ...]
    # limits
    max_delay: float  # seconds
    admit_lag: float  # seconds
    max_messages_per_s: float
    max_bytes_per_s: float
    max_pings_per_s: float
    header_timeout: float  # seconds
    keepalive_timeout: float  # seconds
    max_pending_connections: int
    max_pending_per_ip: int
    gil_switch_ms: float
    step_delay_ms: float  # test hook: a model slower than real time
    fail_step: int  # test hook: this engine step raises; 0 = none
    # admission per client address
    max_conversations_per_ip: int  # 0 = no limit
    max_starts_per_minute: float  # 0 = no limit
    start_burst: int
    ban_after: int  # 0 = never
    ban_window: float  # seconds
    ban_seconds: float
    trusted_proxies: tuple[str, ...]  # addresses or networks (parsed by guards.admission)
    agent_port: int | None
    no_per_ip_limits: bool
    # model
    checkpoint: CheckpointFlags
    fuse_lora: bool
    context: int | None  # frames; None: the checkpoint's
    cfg_coef: float
    device: str | None
    half: bool
    ttt_state_dtype: str | None  # None: the TTT config's
    cache_dir: str | None
    # generation
    temp: float | None  # None: the checkpoint's or LMGen's
    temp_text: float | None
    top_k: int | None
    top_k_text: int | None
    seed: int
    # serving
    max_conversations: int  # the batch size of the one shared model
    idle_timeout: float  # seconds; 0 = never
    max_message_bytes: int
    batch_wait_ms: float
    telemetry_interval: float  # seconds; 0 = only at start
    workers: int  # 1: the model in its own process; 0: in the web process
    threads: int  # 0 = auto
    log_level: str
    # conversation memory
    memory_store: str | None  # None: memory off
    memory_store_default: bool  # the store is --demo's default in the cache, not asked for: where the model
    #                             cannot keep a memory, memory is off instead of an error
    memory_ttl: float  # days
    memory_max_bytes: int | None
    memory_quota_memories: int  # per owner (a client's address group)
    memory_quota_bytes: int
    memory_save_every: int  # chunks; 0 = only when the conversation ends
    memory_format: str
    memory_max_loads: int
    memory_gc_every: float  # seconds; 0 = never
    memory_failures_per_minute: float  # 0 = no limit
    memory_failure_burst: int

    def __post_init__(self) -> None:
        self._check_network()
        self._check_limits()
        self._check_model()
        self._check_serving()
        self._check_memory()

    def _check_network(self) -> None:
        _check.text("host", self.host)
        _num("port", self.port, lo=0, hi=MAX_PORT, integer=True)
        _num("agent_port", self.agent_port, lo=0, hi=MAX_PORT, integer=True, optional=True)
        for name in ("ssl", "static", "api_key_file"):
            _check.path(name, getattr(self, name))
        if not isinstance(self.api_key, (str, type(None))):  # its content: guards.access (which never shows it)
            raise _bad("api_key", "<hidden>", "must be a string or null")
        _check.texts("allowed_origins", self.allowed_origins)
        _check.texts("trusted_proxies", self.trusted_proxies)

    def _check_limits(self) -> None:
        for name in ("max_delay", "admit_lag", "header_timeout", "keepalive_timeout", "ban_window", "ban_seconds"):
            _num(name, getattr(self, name), lo=0, lo_open=True, unit="seconds")
        for name in ("max_messages_per_s", "max_bytes_per_s", "max_pings_per_s"):
            _num(name, getattr(self, name), lo=0, lo_open=True)
        for name in ("max_starts_per_minute", "memory_failures_per_minute", "step_delay_ms"):
            _num(name, getattr(self, name), lo=0)
        for name in ("max_conversations_per_ip", "ban_after", "fail_step"):
            _num(name, getattr(self, name), lo=0, integer=True)
        for name in ("max_pending_connections", "max_pending_per_ip", "start_burst", "memory_failure_burst"):
            _num(name, getattr(self, name), lo=1, integer=True)
        _num("gil_switch_ms", self.gil_switch_ms)
        if not 0 < self.gil_switch_ms <= MAX_GIL_SWITCH_MS:
            raise _bad("gil_switch_ms", self.gil_switch_ms, f"must be in (0, {MAX_GIL_SWITCH_MS}]")
        _check.flag("no_per_ip_limits", self.no_per_ip_limits)

    def _check_model(self) -> None:
        if not isinstance(self.checkpoint, CheckpointFlags):
            raise _bad("checkpoint", self.checkpoint, "must be a CheckpointFlags")
        _check.flag("fuse_lora", self.fuse_lora)
        _check.flag("half", self.half)
        _num("context", self.context, lo=1, integer=True, optional=True, unit="frames")
        _num("cfg_coef", self.cfg_coef)
        if not isinstance(self.device, (str, type(None))):
            raise _bad("device", self.device, "must be a device name (cuda, cpu) or null")
        _check.choice("ttt_state_dtype", self.ttt_state_dtype, STATE_DTYPES, optional=True)
        _check.path("cache_dir", self.cache_dir)
        _num("temp", self.temp, optional=True)
        _num("temp_text", self.temp_text, optional=True)
        _num("top_k", self.top_k, lo=0, integer=True, optional=True)
        _num("top_k_text", self.top_k_text, lo=0, integer=True, optional=True)
        _num("seed", self.seed, integer=True)

    def _check_serving(self) -> None:
        _num("max_conversations", self.max_conversations, lo=1, integer=True)
        _num("max_message_bytes", self.max_message_bytes, lo=MIN_MESSAGE_BYTES, integer=True)
        _num("idle_timeout", self.idle_timeout, lo=0, unit="seconds")
        _num("batch_wait_ms", self.batch_wait_ms, lo=0)
        _num("telemetry_interval", self.telemetry_interval, lo=0, unit="seconds")
        _check.choice("workers", self.workers, WORKERS)
        _num("threads", self.threads, lo=0, integer=True)
        _check.choice("log_level", self.log_level, LOG_LEVELS)

    def _check_memory(self) -> None:
        _check.path("memory_store", self.memory_store)
        _check.flag("memory_store_default", self.memory_store_default)
        _num("memory_ttl", self.memory_ttl, lo=0, lo_open=True, unit="days")
        _num("memory_max_bytes", self.memory_max_bytes, lo=0, integer=True, optional=True)
        _num("memory_quota_memories", self.memory_quota_memories, lo=0, integer=True)
        _num("memory_quota_bytes", self.memory_quota_bytes, lo=0, integer=True)
        _num("memory_save_every", self.memory_save_every, lo=0, integer=True, unit="chunks")
        _num("memory_max_loads", self.memory_max_loads, lo=1, integer=True)
        _num("memory_gc_every", self.memory_gc_every, lo=0, unit="s")
        Compression.parse(self.memory_format)  # ValueError: "invalid memory format 'rank:0': expected ..."

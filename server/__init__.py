"""`moshi-ttt serve`: a real-time, full-duplex websocket server speaking Moshi's protocol.

Data flows one way: websocket bytes → `session` (Ogg Opus → 1920-sample PCM frames) → the engine, through
`engine_api.ServingEngine`: by default `remote.WorkerEngine`, whose `worker` process steps `engine.Engine`
(one batched Mimi + LMGen with TTT, one slot per conversation) and answers through shared-memory rings
(`shm_ring`) and the control messages of `messages`; with `--workers 0` the `Engine` itself, in the web
process → `events` → `session` (PCM → Ogg Opus, text pieces, TTT telemetry) → websocket. The web side never
imports torch (pyproject's torch contract). `protocol` is the wire format, `reasons` why a conversation is
refused or ends, `metrics` the Prometheus metrics, `app` the aiohttp routes, `access`, `admission`,
`http_guard` and `limits` the guards, `memories` / `slot_memory` / `bulk` conversation memory on the web /
model side and between them, `agent` the HAProxy agent, `cli` the command line (and `BackgroundServer`),
`client` a small protocol client for tests and benchmarks. `moshi_ttt.apps.bench.server` benchmarks it.
"""

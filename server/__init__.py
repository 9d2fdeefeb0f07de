"""`moshi-ttt serve`: a real-time, full-duplex websocket server speaking Moshi's protocol.

Data flows one way: websocket bytes → `session` (Ogg Opus → 1920-sample PCM frames) → `engine`
(one batched Mimi + LMGen with TTT, one slot per conversation, stepped on a dedicated thread) →
`session` (PCM → Ogg Opus, text pieces, TTT telemetry) → websocket. `protocol` is the wire format,
`metrics` the Prometheus metrics (prometheus_client), `app` the aiohttp routes, `cli` the command line
(and `BackgroundServer`), `client` a small protocol client for tests and benchmarks, `bench` the server
section of `moshi-ttt bench`.
"""

"""`moshi-ttt serve`: a real-time, full-duplex websocket server speaking Moshi's protocol.

Its rooms, data flowing one way (websocket → web → the engine interface → link → step, and back as events):

  web/     the aiohttp routes (`app`), one conversation per websocket (`session`), Moshi's wire format
           (`protocol`), the HAProxy agent (`agent`), a protocol client (`client`) and the web page (static/)
  guards/  who may connect and how much each connection may cost: `access`, `admission`, `http_guard`, `limits`
  link/    the model worker process and the web process's proxy for it (`remote.WorkerEngine`, `worker`), over
           shared-memory rings (`shm_ring`), control messages (`messages`) and bulk files (`bulk`)
  step/    the batched model step (`engine.Engine`: one Mimi + LMGen with TTT, one slot per conversation) and
           its construction from the `ServeConfig` (`build_engine`)
  memory/  the server's part of conversation memory: tokens, store and saves on the web side (`memories`),
           a slot's fast weights to and from file bytes on the model side (`slot_memory`)
  core/    what every room shares: the configuration (`config.ServeConfig`, built once from the flags), the
           engine interface (`engine_api.ServingEngine`), the events a conversation receives (`events`), why a
           conversation is refused or ends (`reasons`), thread start-up (`threads`)
  metrics.py  the Prometheus metrics;  serve.py  the command line (and `BackgroundServer`)

By default the engine is `link.remote.WorkerEngine`, whose worker process steps `step.engine.Engine`; with
`--workers 0` the `Engine` itself, in the web process. Everything but step/ and memory/slot_memory is
torch-free (pyproject's torch contract), so the web process never imports torch. `moshi_ttt.apps.bench.server`
benchmarks it.
"""

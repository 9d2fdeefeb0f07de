"""The web side: the aiohttp routes (`app`), one conversation per websocket (`session`), Moshi's wire format
(`protocol`), the HAProxy agent (`agent`), a protocol client (`client`) and the web page (static/). It reaches
the model only through `core.engine_api` (never `link` or `step`) and never imports torch."""

"""Conversation memory's torch-free core: what is stored and how, never the tensors themselves.

  compression.py  the stored forms of one layer's delta (`FORMS`) and `--memory-format` (`Compression`)
  header.py       the memory file's versioned metadata header, read without torch; `MemoryRefused`
  seal.py         a client's `Token` and AES-256-GCM sealing of one memory file
  store.py        `MemoryStore`: sealed memories by id; open (header) / read (body), compare-and-swap saves,
                  tombstones, per-owner quotas, the store's bound, `gc`; `open_store(spec)`
  errors.py       `StoreError` and its kinds: `StoreFull`, `QuotaExceeded`, `StaleWrite`
  backends.py     where a store keeps its bytes: a local directory or an S3 bucket

The torch parts sit next to the state they read: `moshi_ttt.ttt.layer_memory` (one layer's delta, closed and
encoded), `moshi_ttt.models.lm_memory` (take / build / prepare / put a model's fast weights) and
`moshi_ttt.models.memory_format` (the file's tensors). Never imports torch (pyproject's contract), so the web
process of `serve` and `moshi-ttt memory` read stores and headers without it.
"""

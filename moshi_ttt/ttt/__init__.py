"""In-Place TTT math, with no Moshi modules: the config, the naive reference (`naive`), the chunk-parallel
ops (`chunk`) and the per-conversation streaming fast-weight state (`stream`)."""

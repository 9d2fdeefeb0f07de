"""The memory file's versioned metadata header (`moshi_ttt.models.memory_format` has the file), read without
torch: the web process of `serve` checks a stored memory's header before the model worker loads it.
"""

from __future__ import annotations

import json
import struct

FORMAT_VERSION = "1"
MAGIC = "moshi_ttt_memory"


class MemoryRefused(ValueError):
    """A memory that this model must not load (another model, a foreign or damaged file)."""


def header(data: bytes) -> dict[str, str]:
    """The metadata header alone (no tensor is read); `MemoryRefused` if `data` is not a memory file of a
    version this code reads."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
    except (struct.error, ValueError, AttributeError) as e:
        raise MemoryRefused(f"not a moshi-ttt memory file (no safetensors header: {e})") from None
    if MAGIC not in meta:
        raise MemoryRefused("not a moshi-ttt memory file (its safetensors header has no "
                            f"{MAGIC!r} version)")
    if meta[MAGIC] != FORMAT_VERSION:
        raise MemoryRefused(f"memory file format version {meta[MAGIC]!r}, this code reads {FORMAT_VERSION!r}")
    return meta

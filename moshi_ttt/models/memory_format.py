"""The memory file: safetensors bytes whose metadata header is versioned.

Header (all strings): `moshi_ttt_memory` = FORMAT_VERSION, `fingerprint`, `frames`, `chunks`, `created`,
`last_used` (Unix seconds), `compression` (`exact`, `bf16`, `rank:R`), `forms` (JSON: layer → form of
`moshi_ttt.memory.compression.FORMS`) and `counters` (JSON: layer → the `LayerMemory` counters). Tensors:
`<layer>.<name>` of that layer's form (`delta`; `u`, `z`; `p`, `q`).
"""

from __future__ import annotations

import json
import typing as tp
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from moshi_ttt.memory.compression import Compression
from moshi_ttt.memory.header import FORMAT_VERSION, MAGIC, MemoryRefused, header
from moshi_ttt.models.lm_memory import LayerMemory, Memory
from moshi_ttt.ttt.layer_memory import decode, encode
from moshi_ttt.utils.io import atomic_write


def dumps(memory: Memory, comp: Compression | str = "exact") -> bytes:
    """The file bytes of `memory` stored as `comp`."""
    comp = Compression.parse(comp) if isinstance(comp, str) else comp
    tensors, forms = {}, {}
    for i, lm in sorted(memory.layers.items()):
        forms[str(i)], parts = encode(lm.delta, lm.factors, comp)
        tensors.update({f"{i}.{k}": v for k, v in parts.items()})
    meta = {MAGIC: FORMAT_VERSION, "fingerprint": memory.fingerprint, "frames": str(memory.frames),
            "chunks": str(memory.chunks), "created": repr(float(memory.created)),
            "last_used": repr(float(memory.last_used)), "compression": str(comp), "forms": json.dumps(forms),
            "counters": json.dumps({str(i): lm.counters for i, lm in sorted(memory.layers.items())})}
    return st_save(tensors, metadata=meta)


def loads(data: bytes, dtype: torch.dtype | None = None) -> Memory:
    """A `Memory` from file bytes (deltas decoded in `dtype`, None: see `decode`); `MemoryRefused` for a
    foreign, damaged or newer file. The fingerprint is checked when it is put into a model (`lm_memory.prepare`)."""
    meta = header(data)
    try:
        tensors = st_load(data)
        forms = json.loads(meta["forms"])
        counters = json.loads(meta["counters"])
        layers = {}
        for key, form in forms.items():
            parts = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == key}
            delta, factors = decode(form, parts, dtype)
            layers[int(key)] = LayerMemory(delta, factors, counters[key])
        return Memory(meta["fingerprint"], layers, frames=int(meta["frames"]), chunks=int(meta["chunks"]),
                      created=float(meta["created"]), last_used=float(meta["last_used"]),
                      compression=meta["compression"])
    except MemoryRefused:
        raise
    except Exception as e:  # safetensors and the decoders raise several types for a damaged file
        raise MemoryRefused(f"damaged moshi-ttt memory file ({type(e).__name__}: {e})") from None


def save(path: str | Path, memory: Memory, comp: Compression | str = "exact") -> Path:
    """Writes `memory` to `path` atomically (a reader sees the old file or the whole new one)."""
    data = dumps(memory, comp)
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def load(path: str | Path, dtype: torch.dtype | None = None) -> Memory:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise MemoryRefused(f"{path}: cannot read the memory file ({e.strerror or e})") from None
    try:
        return loads(data, dtype)
    except MemoryRefused as e:
        raise MemoryRefused(f"{path}: {e}") from None


def nbytes(kind: str, d: int, h: int, layers: int, frames: int = 0, rank: int = 0) -> int:
    """Tensor bytes of one conversation's memory (header excluded) for a stored form of `FORMS`."""
    per: dict[str, tp.Callable[[], int]] = {
        "dense": lambda: 4 * d * h, "factors": lambda: 4 * frames * (d + h), "bf16": lambda: 2 * d * h,
        "rank": lambda: 2 * rank * (d + h)}
    return layers * per[kind]()

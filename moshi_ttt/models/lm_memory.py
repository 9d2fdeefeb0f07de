"""Conversation memory of a `TTTLMModel`: the fast weights of one streaming item, taken out and put back.

`take` (between two steps: device-side clones only) → `build` (any thread: closes the last chunk, forms the
deltas) gives a `Memory` (None for a new conversation that heard nothing: nothing is stored); `prepare` (any
thread) → `put` (between two steps: one copy per layer, right after the item's reset) puts one back. A memory
holds, per TTT layer, W⁽ⁱ⁾ − W⁽⁰⁾ after every frame heard (`moshi_ttt.ttt.layer_memory.close`) and the
counters, plus the model `fingerprint`: a memory is refused (`MemoryRefused`) by a model whose fingerprint
differs. The file format is `memory_format`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import typing as tp

import torch

from moshi_ttt.memory.compression import Compression
from moshi_ttt.memory.header import MemoryRefused
from moshi_ttt.models.lm import TTTLMModel
from moshi_ttt.ttt.layer_memory import close, form_bytes
from moshi_ttt.ttt.stream import COUNTERS


@dataclasses.dataclass
class LayerMemory:
    """delta [d, h] = W⁽ⁱ⁾ − W⁽⁰⁾ (accumulation dtype, or as decoded); factors (U [F, d], Z [F, h]) with
    Uᵀ Z = delta, when known; counters: the state's `updates`, `clips`, `skipped`, `lost` (ints) and
    `last_norm` (float)."""

    delta: torch.Tensor
    factors: tuple[torch.Tensor, torch.Tensor] | None
    counters: dict[str, float]


@dataclasses.dataclass
class Memory:
    """One conversation's memory. frames / chunks: every frame heard and chunk folded, over all the
    conversations it continued; created / last_used: Unix seconds; compression: the form it was read from
    (`exact` while in memory)."""

    fingerprint: str
    layers: dict[int, LayerMemory]
    frames: int
    chunks: int
    created: float
    last_used: float
    compression: str = "exact"

    def meta(self) -> dict[str, tp.Any]:
        """The header fields (what `moshi-ttt memory show` prints: never the content)."""
        return {"fingerprint": self.fingerprint, "frames": self.frames, "chunks": self.chunks,
                "created": self.created, "last_used": self.last_used, "compression": self.compression,
                "layers": sorted(self.layers)}


def fingerprint(model: TTTLMModel) -> str:
    """sha256 (hex) of the TTT config and, per TTT layer, W⁽⁰⁾ as the base MLP applies it and the TTT slow
    weights, each with its name, dtype and shape. Reads every such weight once (≈ 0.6 GB at 7B: compute
    it once per loaded model)."""
    h = hashlib.sha256(json.dumps(model.ttt_config.to_dict(), sort_keys=True).encode())
    for i, g in sorted(model.ttt_gatings().items()):
        parts = {"w0": g._base_weight(), **{k: v for k, v in g.ttt.state_dict().items()}}
        for name, t in sorted(parts.items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{i}.{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def keep_factors(model: TTTLMModel, enabled: bool = True, comp: Compression | str | None = None) -> None:
    """Streaming mode: every TTT layer logs its folded chunks as factors (`TTTState.keep_factors`), so that a
    short conversation's memory is stored as factors, smaller than the format's own form. With `comp` (the
    stored format), a layer's log is dropped once it would take as many bytes as that form: the device never
    holds a log that could not be stored (None: up to the d×h delta's values)."""
    comp = Compression.parse(comp) if isinstance(comp, str) else comp
    for g in model.ttt_gatings().values():
        st = g.ttt_state()
        limit = None
        if comp is not None:  # the log is in the accumulation dtype (z_buf's)
            delta = torch.empty(st.w.shape[1:], dtype=st.z_buf.dtype, device="meta")
            limit = form_bytes(delta, comp) // delta.element_size()
        st.keep_factors(enabled, limit)


Taken = dict[int, tuple[dict[str, torch.Tensor], list | None]]


def take(model: TTTLMModel, item: int) -> Taken:
    """Between two steps: per TTT layer, `TTTState.snapshot(item)` (device clones) and the item's factor log
    (a list copy of immutable tensors; None if the state keeps none)."""
    out = {}
    for i, g in model.ttt_gatings().items():
        st = g.ttt_state()
        log = None if st.factors is None or st.factors[item] is None else list(st.factors[item])
        out[i] = (st.snapshot(item), log)
    return out


@torch.no_grad()
def build(model: TTTLMModel, taken: Taken, fp: str, base: Memory | None = None,
          now: float | None = None) -> Memory | None:
    """The `Memory` of a `take`: each layer's last chunk closed (`close`), its delta and, if logged, its
    factors. `base`: the memory this conversation was resumed from (frames, chunks, created carry on).
    None when there is nothing to remember: a new conversation (no `base`) that heard no frame."""
    now = time.time() if now is None else now
    cfg = model.ttt_config.layer
    gatings = model.ttt_gatings()
    layers = {}
    first = min(taken)
    snap0 = taken[first][0]
    folds = int(snap0["updates"]) + int(snap0["skipped"])
    pos = int(snap0["pos"])
    if base is None and folds == 0 and pos == 0:
        return None
    for i, (snap, log) in taken.items():
        st = gatings[i].ttt_state()
        closed, last = close(st, snap, cfg)
        factors = None
        if log is not None:
            parts = log + ([] if last is None else [last])
            d, h = closed["w"].shape
            if parts and sum(p[1].shape[0] for p in parts) * (d + h) < d * h:  # else `encode` never uses them
                factors = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        delta = closed["w"] - st.w0.to(closed["w"].dtype)
        counters = {k: int(closed[k]) for k in COUNTERS} | {"last_norm": float(closed["last_norm"])}
        layers[i] = LayerMemory(delta, factors, counters)
    base_folds = 0 if base is None else base.layers[first].counters["updates"] + base.layers[first].counters[
        "skipped"]
    new_folds = folds - base_folds
    return Memory(fp, layers, frames=(0 if base is None else base.frames) + new_folds * cfg.chunk_size + pos,
                  chunks=(0 if base is None else base.chunks) + new_folds + (pos > 0),
                  created=now if base is None else base.created, last_used=now)


def capture(model: TTTLMModel, item: int, fp: str, base: Memory | None = None) -> Memory | None:
    """`build(take(...))` in one call (offline use: nothing else is stepping); None: nothing heard."""
    return build(model, take(model, item), fp, base)


Prepared = dict[int, tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]]


@torch.no_grad()
def prepare(model: TTTLMModel, memory: Memory, fp: str) -> Prepared:
    """Any thread: per TTT layer the snapshot that `put` restores (W⁽⁰⁾ + delta on the state's device, an empty
    chunk, the counters). Refuses (`MemoryRefused`) a memory of another fingerprint, layer set or shape."""
    if memory.fingerprint != fp:
        raise MemoryRefused(f"this memory was made by another model or TTT config (fingerprint "
                            f"{memory.fingerprint[:16]}…, this model is {fp[:16]}…): refusing to load it")
    gatings = model.ttt_gatings()
    if set(memory.layers) != set(gatings):
        raise MemoryRefused(f"memory has TTT layers {sorted(memory.layers)}, this model {sorted(gatings)}")
    out = {}
    for i, g in gatings.items():
        st, lm = g.ttt_state(), memory.layers[i]
        if tuple(lm.delta.shape) != tuple(st.w0.shape):
            raise MemoryRefused(f"memory layer {i} delta is {tuple(lm.delta.shape)}, this model's W⁽⁰⁾ is "
                                f"{tuple(st.w0.shape)}")
        tmpl = st.snapshot(0)
        acc = st.w.dtype
        snap = {k: torch.zeros_like(v) for k, v in tmpl.items()}
        snap["w"] = st.w0.to(acc) + lm.delta.to(st.w.device, acc)
        for k in COUNTERS:
            snap[k] = torch.full_like(tmpl[k], int(lm.counters[k]))
        snap["last_norm"] = torch.full_like(tmpl["last_norm"], float(lm.counters["last_norm"]))
        factors = None if lm.factors is None else tuple(f.to(st.w.device, acc) for f in lm.factors)
        out[i] = (snap, factors)
    return out


def put(model: TTTLMModel, item: int, prepared: Prepared) -> None:
    """Between two steps, right after the item's reset: copies a `prepare`d memory into the item, and seeds
    its factor log (if the state keeps one) with the memory's factors."""
    for i, g in model.ttt_gatings().items():
        st = g.ttt_state()
        snap, factors = prepared[i]
        st.restore(item, snap)
        if st.factors is not None and factors is not None:
            st.factors[item] = [factors]


def resume(model: TTTLMModel, item: int, memory: Memory, fp: str) -> None:
    """`put(prepare(...))` in one call (offline use)."""
    put(model, item, prepare(model, memory, fp))

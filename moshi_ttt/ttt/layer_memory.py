"""The memory of one TTT layer for one conversation: closing its last chunk, and the stored forms.

A conversation's memory is W⁽ⁱ⁾ − W⁽⁰⁾ after *every* frame it heard: `close` folds the incomplete last
chunk as a short chunk (conv confined to its L frames), which is what `naive.naive_ttt_mlp` does with a
ragged last chunk. The stored forms of the delta (`Compression`):
* `exact` — dense [d, h] in the accumulation dtype;
* `bf16` — the dense delta in bf16;
* `rank:R` — P [d, R] (left vectors × singular values), Q [R, h] of a truncated SVD, in bf16 (lossy);
and in every format, when they are known and take fewer bytes than that format's form, the chunk factors
U = a·V̂ [F, d] and Z [F, h] (ΔW = Uᵀ Z, F the frames folded) in the accumulation dtype: exact, and the size
follows the frames heard.
"""

from __future__ import annotations

import typing as tp

import torch

from moshi_ttt.memory.compression import FORMS, Compression
from moshi_ttt.ttt.config import TTTConfig
from moshi_ttt.ttt.stream import TTTState, chunk_update


@torch.no_grad()
def close(state: TTTState, snapshot: tp.Mapping[str, torch.Tensor], cfg: TTTConfig
          ) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
    """`snapshot` (of `state.snapshot`) with its incomplete chunk of `pos` frames folded as a short chunk:
    a new snapshot with `pos` = 0 and its counters advanced, and that chunk's factors (a·V̂ [L, d], Z [L, h])
    (None when pos = 0). Reads `pos` (host side); neither the state nor the snapshot is changed."""
    out = {k: v.clone() for k, v in snapshot.items()}
    n = int(snapshot["pos"])
    if n == 0:
        return out, None
    zc, sc = snapshot["z_buf"][None, :n], snapshot["s_buf"][None, :n]
    va, zc, norm, a, ok, clipped = chunk_update(zc, sc, state, cfg)
    out["w"].addmm_(va[0], zc[0])
    out["last_norm"] = torch.where(a[0] != 0, norm[0], 0.)
    for k, inc in (("updates", ok), ("clips", clipped), ("skipped", ~ok)):
        out[k] = out[k] + inc[0].long()
    out["pos"] = torch.zeros_like(out["pos"])
    out["z_buf"].zero_()
    out["s_buf"].zero_()
    return out, (va[0].T.clone(), zc[0].clone())


def factor_values(factors: tuple[torch.Tensor, torch.Tensor] | None) -> int:
    return -1 if factors is None else factors[0].numel() + factors[1].numel()


def form_bytes(delta: torch.Tensor, comp: Compression) -> int:
    """Tensor bytes of `comp`'s own form of a delta [d, h] (not the factors)."""
    d, h = delta.shape
    return {"exact": delta.element_size() * d * h, "bf16": 2 * d * h}.get(comp.kind, 2 * min(comp.rank or 0, d, h)
                                                                           * (d + h))


def encode(delta: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor] | None, comp: Compression
           ) -> tuple[str, dict[str, torch.Tensor]]:
    """One layer's delta [d, h] (and, if known, its factors U [F, d], Z [F, h] with Uᵀ Z = delta) in the
    stored form ⇒ (form name of `FORMS`, tensors by short name), contiguous on the CPU: the factors wherever
    they take fewer bytes than `comp`'s form."""
    if factors is not None and factor_values(factors) * factors[0].element_size() < form_bytes(delta, comp):
        return "factors", {"u": factors[0].cpu().contiguous(), "z": factors[1].cpu().contiguous()}
    if comp.kind == "exact":
        return "dense", {"delta": delta.cpu().contiguous()}
    if comp.kind == "bf16":
        return "bf16", {"delta": delta.to(torch.bfloat16).cpu().contiguous()}
    r = min(comp.rank, *delta.shape)
    with torch.random.fork_rng(devices=[]):  # svd_lowrank draws its sketch from the global RNG
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(delta.float().cpu(), q=r, niter=4)
    return "rank", {"p": (u * s).to(torch.bfloat16).contiguous(), "q": v.T.to(torch.bfloat16).contiguous()}


def decode(form: str, tensors: tp.Mapping[str, torch.Tensor], dtype: torch.dtype | None = None
           ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """The inverse of `encode`: (delta [d, h] in `dtype`, factors or None). dtype None: the stored dtype of an
    exact form, fp32 for the bf16 forms."""
    if dtype is None:
        dtype = next(iter(tensors.values())).dtype if form in ("dense", "factors") else torch.float32
    if form == "factors":
        u, z = tensors["u"].to(dtype), tensors["z"].to(dtype)
        return u.T @ z, (u, z)
    if form in ("dense", "bf16"):
        return tensors["delta"].to(dtype), None
    if form == "rank":
        return tensors["p"].to(dtype) @ tensors["q"].to(dtype), None
    raise ValueError(f"unknown memory form {form!r}: expected one of {FORMS}")

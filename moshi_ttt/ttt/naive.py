"""Naive reference of In-Place TTT (Algorithm 1), for tests and benchmarks only.

A literal per-chunk loop with an explicit fast weight W (d×h): apply with the current W, then
W += η · clip(V̂ᵀZ). Slow and memory-hungry on purpose: it is the definition the fast paths are
checked against.
"""

from __future__ import annotations

import torch

from moshi_ttt.ttt.chunk import chunk_conv
from moshi_ttt.ttt.config import TTTConfig


def naive_ttt_mlp(z: torch.Tensor, src: torch.Tensor, w_down: torch.Tensor, conv_w: torch.Tensor | None,
                  w_t: torch.Tensor | None, cfg: TTTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """z [B, T, h] gated activations, src [B, T, d] target source, w_down [d, h] = W⁽⁰⁾.

    Returns (out [B, T, d], final fast weights [B, d, h]), all in z's dtype. The final W has the ragged
    last chunk (T mod C frames) folded as a short chunk, its conv confined to those frames: W after every
    frame heard, the definition of a saved conversation memory (`moshi_ttt.ttt.layer_memory.close`).
    """
    B, T, _ = z.shape
    C = cfg.chunk_size
    outs, finals = [], []
    for b in range(B):
        W = w_down.to(z.dtype).clone()
        out = []
        for s in range(0, T, C):
            zc = z[b, s:s + C]
            out.append(zc @ W.T)
            c = chunk_conv(src[b:b + 1, s:s + C], conv_w, C, cfg.past_frames)[0]
            v = c if w_t is None else c @ w_t.to(c.dtype)
            delta = v.T @ zc  # [d, h]
            if not torch.isfinite(delta).all():
                continue
            norm = torch.linalg.matrix_norm(delta)
            if cfg.clip_norm is not None and norm > cfg.clip_norm:
                delta = delta * (cfg.clip_norm / norm)
            W = W + cfg.lr * delta
        outs.append(torch.cat(out))
        finals.append(W)
    return torch.stack(outs), torch.stack(finals)

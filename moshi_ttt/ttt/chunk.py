"""Functional core of In-Place TTT: the chunk-confined target conv and the parallel (chunkwise) path.

Notation (per batch item): Z [T, h] is the gated MLP activation φ(H W_gateᵀ) ⊙ (H W_upᵀ), src [T, d]
is the target source (X0 or the MLP input), c = conv(src) [T, d] with zero padding at *chunk* edges,
V̂ = c · W_t [T, d]. Chunk j's update is ΔW_j = V̂_jᵀ Z_j (d×h), applied as W⁽ⁱ⁾ = W⁽⁰⁾ + Σ_{j<i} a_j ΔW_j
with a_j = η · clip_scale_j · finite_j.

The parallel path never forms a d×h matrix per chunk. It uses the chunk-causal linear-attention form
    O_i = Z_i W⁽⁰⁾ᵀ + Σ_{j<i} a_j (Z_i Z_jᵀ) c_j W_t,
whose extra memory is O(T²) scores (T²/2 with the block loop below) instead of chunks × d × h, and the clip
norm via Gram matrices ‖V̂_jᵀ Z_j‖_F² = ⟨V̂_j V̂_jᵀ, Z_j Z_jᵀ⟩ (C×C per chunk).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from moshi_ttt.ttt.config import TTTConfig


def chunk_conv(src: torch.Tensor, weight: torch.Tensor | None, chunk: int, past: int) -> torch.Tensor:
    """Depthwise conv over time, confined to chunks of `chunk` frames with zero padding at chunk edges.

    src: [B, T, d]; weight: [d, 1, K] (None ⇒ identity, the no-conv ablation).
    out[t] = Σ_k weight[:, 0, k] ⊙ src[t - past + k], terms outside t's chunk are zero. Returns [B, T, d].
    """
    if weight is None:
        return src
    B, T, d = src.shape
    K = weight.shape[-1]
    n = -(-T // chunk)
    x = F.pad(src, (0, 0, 0, n * chunk - T))  # [B, n*C, d]
    x = x.view(B * n, chunk, d).transpose(1, 2)  # [B*n, d, C]
    x = F.pad(x, (past, K - 1 - past))
    y = F.conv1d(x, weight.to(x.dtype), groups=d)  # [B*n, d, C]
    return y.transpose(1, 2).reshape(B, n * chunk, d)[:, :T]


def frobenius_from_gram(sq: torch.Tensor) -> torch.Tensor:
    """sqrt of a squared norm with a finite gradient at 0 (ΔW = 0 under zero init): d sqrt(0) = inf
    would turn 0·inf into NaN gradients for every parameter."""
    pos = sq > 0
    return torch.where(pos, torch.where(pos, sq, 1.).sqrt(), 0.)


def frame_finite(*xs: torch.Tensor) -> torch.Tensor:
    """[B, T] (or [B]): every value of the frame finite, for all xs [B, T, *] (or [B, *]).

    Tested on the sum over features — one read pass instead of four for `isfinite(x).all(-1)`; NaN and
    Inf always propagate into the sum. (A sum could overflow only for values ~1e38, whose ΔW would
    overflow too.) The streaming fold applies the same test to a chunk's Z and c rows, so both paths
    skip the same chunks."""
    ok = torch.isfinite(xs[0].sum(-1))
    for x in xs[1:]:
        ok = ok & torch.isfinite(x.sum(-1))
    return ok


def chunk_coefficients(z: torch.Tensor, c: torch.Tensor, frame_ok: torch.Tensor, w_t: torch.Tensor | None,
                       cfg: TTTConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-chunk update coefficient a_j = η · s_j · finite_j and diagnostics.

    z [B, T, h], c [B, T, d] (fp32 or fp64), frame_ok [B, T] (`frame_finite` of Z, source, target).
    Returns (coef [B, n], clipped [B, n] bool, skipped [B, n] bool). A chunk is skipped when any of its
    frames is non-finite (then ΔW would be non-finite). The ragged last chunk is zero-padded, which
    adds nothing to ΔW.
    """
    B, T, h = z.shape
    C = cfg.chunk_size
    n = -(-T // C)
    pad = n * C - T
    finite = F.pad(frame_ok, (0, pad), value=True).view(B, n, C).all(-1)
    coef = torch.full((B, n), float(cfg.lr), dtype=z.dtype, device=z.device)
    clipped = torch.zeros(B, n, dtype=torch.bool, device=z.device)
    if cfg.clip_norm is not None:
        zc = F.pad(z, (0, 0, 0, pad)).view(B, n, C, h)
        cc = F.pad(c, (0, 0, 0, pad)).view(B, n, C, -1)
        zs = torch.where(finite[..., None, None], zc, 0.)
        cs = torch.where(finite[..., None, None], cc, 0.)
        v = cs if w_t is None else cs @ w_t.to(cs.dtype)
        sq = ((zs @ zs.transpose(-1, -2)) * (v @ v.transpose(-1, -2))).sum((-1, -2))
        norm = frobenius_from_gram(sq)
        finite = finite & torch.isfinite(norm)
        clipped = finite & (norm > cfg.clip_norm)
        scale = torch.where(clipped, cfg.clip_norm / torch.where(clipped, norm, 1.), 1.)
        coef = coef * scale
    coef = torch.where(finite, coef, 0.)
    return coef, clipped, ~finite


def parallel_extra(z: torch.Tensor, src: torch.Tensor, conv_w: torch.Tensor | None,
                   w_t: torch.Tensor | None, cfg: TTTConfig) -> tuple[torch.Tensor, torch.Tensor,
                                                                      torch.Tensor, torch.Tensor]:
    """The TTT part of the output, O - Z W⁽⁰⁾ᵀ, for whole sequences (training, prefill).

    z [B, T, h], src [B, T, d]: same float dtype (fp32 recommended; fp64 for exactness tests).
    Returns (extra [B, T, d], coef [B, n], clipped [B, n], skipped [B, n]). Differentiable w.r.t. z, src,
    conv_w and w_t. For T ≤ C the extra is exactly zero and carries no graph to the target params.
    """
    B, T, h = z.shape
    C = cfg.chunk_size
    n = -(-T // C)
    if n == 1:
        zero = z.new_zeros(B, 1)
        flag = torch.zeros(B, 1, dtype=torch.bool, device=z.device)
        return src.new_zeros(B, T, src.shape[-1]), zero, flag, flag
    c = chunk_conv(src, conv_w, C, cfg.past_frames)
    coef, clipped, skipped = chunk_coefficients(z, c, frame_finite(z, src, c), w_t, cfg)
    frame_coef = coef.repeat_interleave(C, dim=1)[:, :T, None]  # [B, T, 1]
    ok = frame_coef != 0
    # where(), not multiplication: a skipped chunk may hold NaN/Inf and 0·NaN = NaN.
    keys = torch.where(ok, z, 0.)
    vals = torch.where(ok, c * frame_coef, 0.)
    # Block pairs (i, j<i) over split views: slicing a growing prefix instead would make autograd
    # zero-fill a full-size gradient per chunk.
    zs, ks, vs = z.split(C, dim=1), keys.split(C, dim=1), vals.split(C, dim=1)
    outs = [src.new_zeros(B, zs[0].shape[1], src.shape[-1])]
    for i in range(1, n):
        acc = (zs[i] @ ks[0].transpose(1, 2)) @ vs[0]
        for j in range(1, i):
            acc = acc + (zs[i] @ ks[j].transpose(1, 2)) @ vs[j]
        outs.append(acc)
    extra = torch.cat(outs, dim=1)
    if w_t is not None:
        extra = extra @ w_t.to(extra.dtype)
    return extra, coef, clipped, skipped

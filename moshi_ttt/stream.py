"""Streaming In-Place TTT: per-conversation fast-weight state and the per-frame step.

Design (why it is shaped like this):

* Every state tensor is preallocated and only ever updated in place, and the step never branches on
  tensor values or reads them on the host: on CUDA, moshi's `LMGen` replays `forward_text` as a CUDA
  graph, so Python-side logic would run at capture time only (the prior attempt's updates stopped after
  two steps). A chunk boundary is a tensor mask (`completing`), not an `if`.
* Each batch item has its own phase (`pos`) so conversations that started at different times share a
  batch. Items whose `exec_mask` is False are left exactly unchanged.
* Amortised update. Computing ΔW = V̂ᵀZ (C·d·h FLOPs) at the boundary would have to run on *every*
  step in a graph. Instead the completed chunk is kept (Z and target source, two-slot ring buffer) and
  folded into the fast weight one frame per step during the next chunk (a rank-1 update), while the
  not-yet-folded frames of that chunk act through a small attention term Σ_j (z·z_j) a·c_j. Output is
  identical to applying the whole ΔW at the boundary.
* The fast weight is kept in source space: W − W⁽⁰⁾ = W_tᵀ · U with U = Σ_i a_i c_iᵀ Z_i [d, h]
  (c = chunk-confined conv of the source, a_i = η·clip·finite). One d×d product per step instead
  of one per folded frame. Without the W_target projection (ablation) W − W⁽⁰⁾ = U.
* The conv is built incrementally: frame p adds w_k ⊙ src_p to rows p + past − k (the K rows it
  touches, dropped outside the chunk — exactly the zero padding at chunk edges), so a chunk's conv is
  complete when its last frame arrives, at O(K·d) per step.

Per-step cost of one layer: apply U·z (d·h) + rank-1 fold (d·h) + projection (d²) + attention over
the two buffered chunks (O(C·(d+h))). State per item: U [d, h] + 2 chunks × (h + d), fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from moshi.modules.streaming import State

from .config import TTTConfig
from .ops import frame_finite, frobenius_from_gram


@dataclass
class TTTState(State):
    """Per-conversation TTT state of one layer; all tensors have batch as first dim.

    u: [B, d, h] folded fast-weight delta in source space (see module doc).
    z_buf: [B, 2C, h], c_buf: [B, 2C, d]: two chunk slots of Z and of the (unscaled) target conv c;
        `slot` is the one being filled, the other holds the previous chunk (being folded, scaled by
        `prev_coef`). Always finite.
    pos: [B] frames already in the current chunk. slot: [B] 0/1. prev_coef: [B] a of the previous chunk.
    cur_bad: [B] current chunk saw a non-finite value. updates / clips / skipped: [B] counters.
    """

    u: torch.Tensor = None  # type: ignore[assignment]
    z_buf: torch.Tensor = None  # type: ignore[assignment]
    c_buf: torch.Tensor = None  # type: ignore[assignment]
    pos: torch.Tensor = None  # type: ignore[assignment]
    slot: torch.Tensor = None  # type: ignore[assignment]
    prev_coef: torch.Tensor = None  # type: ignore[assignment]
    cur_bad: torch.Tensor = None  # type: ignore[assignment]
    updates: torch.Tensor = None  # type: ignore[assignment]
    clips: torch.Tensor = None  # type: ignore[assignment]
    skipped: torch.Tensor = None  # type: ignore[assignment]

    @classmethod
    def create(cls, batch_size: int, dim: int, hidden: int, chunk: int, device, dtype) -> TTTState:
        def z(*shape, dt=dtype):
            return torch.zeros(*shape, device=device, dtype=dt)
        return cls(batch_size, torch.device(device),
                   u=z(batch_size, dim, hidden), z_buf=z(batch_size, 2 * chunk, hidden),
                   c_buf=z(batch_size, 2 * chunk, dim), pos=z(batch_size, dt=torch.long),
                   slot=z(batch_size, dt=torch.long), prev_coef=z(batch_size),
                   cur_bad=z(batch_size, dt=torch.bool), updates=z(batch_size, dt=torch.long),
                   clips=z(batch_size, dt=torch.long), skipped=z(batch_size, dt=torch.long))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in ("u", "z_buf", "c_buf", "pos", "slot", "prev_coef",
                                              "cur_bad", "updates", "clips", "skipped")}

    def reset(self, reset_mask: torch.Tensor) -> None:
        """Restores exactly the masked items to W⁽⁰⁾ with empty buffers; others are untouched."""
        super().reset(reset_mask)
        m = reset_mask.to(self.u.device, torch.bool)
        for t in self.tensors().values():
            t.masked_fill_(m.view(-1, *([1] * (t.dim() - 1))), 0)

    @property
    def chunk_size(self) -> int:
        return self.z_buf.shape[1] // 2

    @property
    def bytes(self) -> int:
        """Bytes of per-conversation state (all items / batch)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values()) // self.batch_size


def _taps(conv_w: torch.Tensor | None, past: int, d: int, dtype, device) -> tuple[torch.Tensor, int]:
    """Conv taps as [K, d] (identity tap without conv) and the number of past frames."""
    if conv_w is None:
        return torch.ones(1, d, dtype=dtype, device=device), 0
    return conv_w[:, 0, :].T.to(dtype), past


def _rows(buf: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """buf [B, N, X], idx [B, R] ⇒ [B, R, X]."""
    return buf.gather(1, idx[..., None].expand(-1, -1, buf.shape[-1]))


def _put_rows(buf: torch.Tensor, idx: torch.Tensor, value: torch.Tensor, mask: torch.Tensor) -> None:
    """buf[b, idx[b, r]] = value[b, r] where mask[b, r], in place (idx distinct per item)."""
    full = idx[..., None].expand(-1, -1, buf.shape[-1])
    buf.scatter_(1, full, torch.where(mask[..., None], value, buf.gather(1, full)))


def stream_step(state: TTTState, z: torch.Tensor, src: torch.Tensor, conv_w: torch.Tensor | None,
                w_t: torch.Tensor | None, cfg: TTTConfig) -> torch.Tensor:
    """One frame for every batch item. z [B, h], src [B, d] in the state dtype. Returns extra [B, d]
    (the layer output minus Z W⁽⁰⁾ᵀ). Updates `state` in place; graph-safe (no host syncs/branches)."""
    C = state.chunk_size
    B, h = z.shape
    d = src.shape[1]
    ex = state.exec_mask
    exl = ex.long()
    w_t = None if w_t is None else w_t.to(z.dtype)
    slot_of_row = torch.arange(2 * C, device=z.device) // C  # [2C]
    row_in_slot = torch.arange(2 * C, device=z.device) % C

    # Previous chunk (slot 1 - slot): fold its frame `pos` into U; frames after it act by attention.
    prev_start = (1 - state.slot) * C
    fold = (prev_start + state.pos)[:, None]  # [B, 1]
    coef = (state.prev_coef * ex)[:, None, None]
    state.u.baddbmm_((_rows(state.c_buf, fold) * coef).transpose(1, 2), _rows(state.z_buf, fold))
    pending = (slot_of_row[None] != state.slot[:, None]) & (row_in_slot[None] >= (state.pos + exl)[:, None])
    scores = torch.where(pending, torch.bmm(state.z_buf, z[:, :, None])[..., 0], 0.)  # [B, 2C]
    extra = torch.bmm(state.u, z[:, :, None])[..., 0]
    extra = extra + torch.bmm(scores[:, None], state.c_buf)[:, 0] * state.prev_coef[:, None]
    if w_t is not None:
        extra = extra @ w_t

    # Current chunk: store z, add the frame's conv contributions (sanitised; non-finite ⇒ chunk bad).
    taps, past = _taps(conv_w, cfg.past_frames, d, z.dtype, z.device)
    K = taps.shape[0]
    k = torch.arange(K, device=z.device)
    tgt = state.pos[:, None] + past - k[None]  # [B, K] rows of the current chunk this frame feeds
    valid = (tgt >= 0) & (tgt < C) & ex[:, None]
    first = (k[None] == 0) | (state.pos[:, None] == 0)  # the first frame touching that row
    idx = state.slot[:, None] * C + tgt % C  # distinct rows since K ≤ C; invalid ones are masked
    contrib = taps[None] * src[:, None, :]  # [B, K, d]
    new_c = torch.where(first[..., None], contrib, _rows(state.c_buf, idx) + contrib)
    frame_ok = frame_finite(z, new_c.flatten(1))
    _put_rows(state.c_buf, idx, torch.nan_to_num(new_c, 0., 0., 0.), valid)
    row = (state.slot * C + state.pos)[:, None]
    _put_rows(state.z_buf, row, torch.nan_to_num(z, 0., 0., 0.)[:, None], ex[:, None])
    state.cur_bad.copy_(state.cur_bad | (ex & ~frame_ok))
    new_pos = state.pos + exl
    completing = ex & (new_pos == C)

    # Chunk boundary, computed unconditionally and selected by `completing`.
    ok = ~state.cur_bad
    a = torch.full_like(state.prev_coef, float(cfg.lr))
    clipped = torch.zeros_like(ok)
    if cfg.clip_norm is not None:  # config constant: a Python branch here is graph-safe
        cur = state.slot[:, None] * C + torch.arange(C, device=z.device)[None]
        cz, cc = _rows(state.z_buf, cur), _rows(state.c_buf, cur)
        v = cc if w_t is None else cc @ w_t
        sq = ((cz @ cz.transpose(1, 2)) * (v @ v.transpose(1, 2))).sum((1, 2))
        norm = frobenius_from_gram(sq)
        ok = ok & torch.isfinite(norm)
        clipped = ok & (norm > cfg.clip_norm)
        a = a * torch.where(clipped, cfg.clip_norm / torch.where(clipped, norm, 1.), 1.)
    a = torch.where(ok, a, 0.)
    state.prev_coef.copy_(torch.where(completing, a, state.prev_coef))
    state.slot.copy_(torch.where(completing, 1 - state.slot, state.slot))
    state.pos.copy_(torch.where(completing, 0, new_pos))
    state.cur_bad.copy_(state.cur_bad & ~completing)
    state.updates.add_((completing & ok).long())
    state.clips.add_((completing & clipped).long())
    state.skipped.add_((completing & ~ok).long())
    return extra


def _prev_chunk(state: TTTState) -> tuple[torch.Tensor, torch.Tensor]:
    C = state.chunk_size
    rows = ((1 - state.slot) * C)[:, None] + torch.arange(C, device=state.u.device)[None]
    return _rows(state.z_buf, rows), _rows(state.c_buf, rows)


@torch.no_grad()
def fast_weight_delta(state: TTTState, w_t: torch.Tensor | None) -> torch.Tensor:
    """W − W⁽⁰⁾ of every item, [B, d, h] (host-side telemetry / tests; not for the per-frame path)."""
    pz, pc = _prev_chunk(state)
    pending = torch.arange(state.chunk_size, device=pz.device)[None] >= state.pos[:, None]
    total = state.u + (pc * state.prev_coef[:, None, None]).transpose(1, 2) @ torch.where(pending[..., None], pz, 0.)
    return total if w_t is None else w_t.to(total.dtype).T @ total


@torch.no_grad()
def last_delta_norm(state: TTTState, w_t: torch.Tensor | None) -> torch.Tensor:
    """‖ΔW‖_F of each item's last completed chunk before clipping/η, [B]; 0 before the first chunk and
    when the last chunk was skipped (non-finite) or had no effect (η = 0)."""
    pz, pc = _prev_chunk(state)
    v = pc if w_t is None else pc @ w_t.to(pc.dtype)
    sq = ((pz @ pz.transpose(1, 2)) * (v @ v.transpose(1, 2))).sum((1, 2))
    return torch.where(state.prev_coef != 0, frobenius_from_gram(sq), 0.)

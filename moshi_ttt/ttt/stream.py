"""Streaming In-Place TTT: per-conversation fast weights, the per-frame step and the per-chunk fold.

Design (why it is shaped like this):

* Apply-then-update means every frame of chunk i is computed with the same W⁽ⁱ⁾. So each item keeps
  its fast weight *itself*, `w` [d, h] = W⁽ⁱ⁾ (W⁽⁰⁾ plus the folded deltas, fp32 — fp64 for fp64
  models), and the per-frame step computes the down-projection with it *instead of* W⁽⁰⁾: one read
  of one per-conversation d×h matrix per frame and no write to it. At B = 1 that is exactly the bytes
  of the plain MLP. A bf16 model applies a bf16 copy (`w_apply`, refreshed at each fold) so the
  per-frame bytes stay those of the bf16 base weight, while deltas still accumulate in fp32.
* The per-frame step (`stream_step`) only appends the frame to the current chunk: Z into `z_buf`
  [C + 1, h] and the target source into `s_buf` [C + 1, d], each one `index_copy_` of one row. Row C
  is a scratch row: an item whose `exec_mask` is False (or whose chunk is full) writes there instead of
  being masked, so no row is gathered, blended or scattered; scratch rows are never read. The step
  never branches on tensor values and never reads the device from the host: on CUDA, moshi's `LMGen`
  replays `forward_text` as a CUDA graph, in which Python runs only at capture time. Items whose
  `exec_mask` is False are left exactly unchanged (outside their scratch rows).
* The fold (`fold`) is data-dependent work — a chunk completes on a different frame for every
  conversation — so it is *not* part of the per-frame step. It runs once per completed chunk, for
  exactly the items whose chunk completed, between two steps: c = the chunk-confined target conv of the
  chunk's sources (`ops.chunk_conv`, the parallel path's own function: zero padding at chunk edges, so
  a chunk's conv needs only its own frames), ΔW = a · V̂ᵀZ with V̂ = c · W_target, one C·d·h product
  and one pass over that item's `w`; then its chunk restarts. `a = η · clip ·
  finite` is decided there (clip norm from C×C Gram matrices; a chunk with a non-finite frame is
  skipped and counted). The finiteness test runs there too, once per chunk, on the chunk's Z, sources
  and c (`ops.frame_finite`, the parallel path's test), so the per-frame step does not pay for it.
* Who folds, and why that is safe under CUDA graphs. The host decides every exec mask and every reset,
  so it knows each conversation's frame count without reading the device: `generate.TTTLMGen` (moshi's
  `LMGen` plus a host-side `FoldClock`) calls `TTTLMModel.ttt_fold(items)` right after each step,
  outside the captured `forward_text`, with the items whose chunk that step completed. Such a driver
  marks the states `host_folds = True`. Without one (the layer alone in `with layer.streaming(B)`,
  `TTTLMModel` under moshi's plain `LMGen` on CPU or with `NO_CUDA_GRAPH=1`), the layer folds itself
  after each frame, reading which items completed (free on CPU; a tiny sync on an eager GPU); during
  a CUDA-graph capture that self-fold would be frozen into the graph, so it raises instead and names
  `TTTLMGen`. Either way the invariant between two driver steps is the same: no item has a completed
  but unfolded chunk (`pos < C`), so the next frame of every item uses exactly W⁽ⁱ⁾. A frame that
  arrives while its item's chunk is still unfolded (a driver that forgot to fold) is not recorded and
  is counted in `lost`.

Per-frame cost of a TTT layer: the base MLP's own reads with W⁽⁰⁾ replaced by each item's `w_apply`
(one d×h read per conversation, none written), plus two row writes (h + d values). Per chunk: the fold
(C·d² + C·d·h FLOPs and one read+write of `w`). State per conversation and layer: `w` [d, h] fp32
(+ `w_apply` [d, h] in the model dtype for bf16/fp16 models) + one chunk of Z and sources plus their
scratch rows ((C + 1)·(h + d) fp32).
"""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass

import torch
from moshi.modules.streaming import State
from torch.nn import functional as F

from moshi_ttt.ttt.chunk import chunk_conv, frame_finite, frobenius_from_gram
from moshi_ttt.ttt.config import TTTConfig

COUNTERS = ("updates", "clips", "skipped", "lost")


@dataclass
class TTTState(State):
    """Per-conversation TTT state of one layer; all tensors have batch as first dim.

    w: [B, d, h] fast weight W⁽ⁱ⁾ (accumulation dtype: fp32, fp64 for fp64 models).
    w_apply: [B, d, h] the weight the per-frame step multiplies by: `w` itself, or its copy in the
        model dtype (bf16/fp16 models), refreshed at every fold and reset.
    z_buf: [B, C + 1, h], s_buf: [B, C + 1, d]: Z and the target source (X0 or the MLP input) of the
        current chunk's frames in rows 0..pos−1, as they came (non-finite values are caught by the
        fold); row C is scratch, never read.
    pos: [B] frames already in the current chunk (C = complete, waiting for its fold).
    last_norm: [B] ‖V̂ᵀZ‖_F of the last folded chunk (0 if it was skipped or η = 0).
    updates / clips / skipped / lost: [B] counters (lost: frames that arrived before a due fold).
    base_weight: returns W⁽⁰⁾ [d, h] (the module's current down-projection), for resets.
    w_t_rows: W_targetᵀ [d, d] in the accumulation dtype, contiguous (None without W_target): the fold's
        V̂ᵀ = W_targetᵀ cᵀ. Read from the module when streaming starts (slow weights are fixed while
        streaming); row-major this way round is also the faster GEMM on CPU.
    conv: the target conv weight [d, 1, K] in the accumulation dtype (None: no conv), seeing `past`
        past frames; read when streaming starts, like `w_t_rows`.
    row0: [B] b·(C + 1), item b's first row in the flattened buffers [B·(C + 1), ·].
    host_folds: a driver folds after each step (`TTTLMGen`); otherwise the layer folds itself.
    """

    w: torch.Tensor = None  # type: ignore[assignment]
    w_apply: torch.Tensor = None  # type: ignore[assignment]
    z_buf: torch.Tensor = None  # type: ignore[assignment]
    s_buf: torch.Tensor = None  # type: ignore[assignment]
    pos: torch.Tensor = None  # type: ignore[assignment]
    last_norm: torch.Tensor = None  # type: ignore[assignment]
    updates: torch.Tensor = None  # type: ignore[assignment]
    clips: torch.Tensor = None  # type: ignore[assignment]
    skipped: torch.Tensor = None  # type: ignore[assignment]
    lost: torch.Tensor = None  # type: ignore[assignment]
    base_weight: tp.Callable[[], torch.Tensor] | None = None
    w_t_rows: torch.Tensor | None = None
    conv: torch.Tensor | None = None
    past: int = 0
    host_folds: bool = False
    row0: torch.Tensor = None  # type: ignore[assignment]

    @classmethod
    def create(cls, batch_size: int, chunk: int, base_weight: tp.Callable[[], torch.Tensor],
               acc_dtype: torch.dtype, w_target: torch.Tensor | None = None,
               conv_weight: torch.Tensor | None = None, past: int = 0) -> TTTState:
        """W⁽⁰⁾ = base_weight() [d, h] gives the device, the shapes and the apply dtype; w_target [d, d];
        conv_weight [d, 1, K] (None: no conv) seeing `past` past frames."""
        w0 = base_weight()
        (d, h), device = w0.shape, w0.device

        def z(*shape, dt=acc_dtype):
            return torch.zeros(*shape, device=device, dtype=dt)
        w = w0.to(acc_dtype)[None].repeat(batch_size, 1, 1)
        w_apply = w if w0.dtype == acc_dtype else w0[None].repeat(batch_size, 1, 1)
        long = dict(dt=torch.long)
        return cls(batch_size, torch.device(device), w=w, w_apply=w_apply,
                   z_buf=z(batch_size, chunk + 1, h), s_buf=z(batch_size, chunk + 1, d), pos=z(batch_size, **long),
                   last_norm=z(batch_size),
                   updates=z(batch_size, **long), clips=z(batch_size, **long), skipped=z(batch_size, **long),
                   lost=z(batch_size, **long), base_weight=base_weight,
                   w_t_rows=None if w_target is None else w_target.detach().T.to(acc_dtype).contiguous(),
                   conv=None if conv_weight is None else conv_weight.detach().to(acc_dtype).contiguous(),
                   past=past, row0=torch.arange(batch_size, device=device) * (chunk + 1))

    def tensors(self, scratch: bool = False) -> dict[str, torch.Tensor]:
        """Every per-item state tensor (`w_apply` only when it is not `w` itself); the chunk buffers as
        views of their chunk rows, unless `scratch` (then whole, scratch rows included)."""
        names = ["w", "z_buf", "s_buf", "pos", "last_norm", *COUNTERS]
        if self.w_apply is not self.w:
            names.insert(1, "w_apply")
        out = {k: getattr(self, k) for k in names}
        if not scratch:
            out["z_buf"], out["s_buf"] = out["z_buf"][:, :-1], out["s_buf"][:, :-1]
        return out

    def reset(self, reset_mask: torch.Tensor) -> None:
        """Restores exactly the masked items to W⁽⁰⁾ with an empty chunk; others are untouched.
        Host-driven (moshi calls it eagerly, never inside a captured step)."""
        super().reset(reset_mask)
        m = reset_mask.to(self.w.device, torch.bool)
        for k, t in self.tensors(scratch=True).items():
            if k not in ("w", "w_apply"):
                t.masked_fill_(m.view(-1, *([1] * (t.dim() - 1))), 0)
        items = m.nonzero().flatten().tolist()
        if items:
            w0 = self.base_weight()
            for b in items:
                self.w[b].copy_(w0)
                if self.w_apply is not self.w:
                    self.w_apply[b].copy_(w0)

    @property
    def chunk_size(self) -> int:
        return self.z_buf.shape[1] - 1

    @property
    def bytes(self) -> int:
        """Bytes of per-conversation state (all items / batch)."""
        return sum(t.numel() * t.element_size() for t in self.tensors(scratch=True).values()) // self.batch_size


def apply_fast_weight(state: TTTState, z: torch.Tensor) -> torch.Tensor:
    """z [B, T, h] (model dtype) ⇒ z · W⁽ⁱ⁾ᵀ [B, T, d], each item with its own fast weight.

    B = 1 goes through the same `F.linear` kernel as moshi's `linear_out`, so while W⁽ⁱ⁾ = W⁽⁰⁾ the result
    is bitwise the base MLP's. (B is a shape: this branch is fixed at capture time.)"""
    w = state.w_apply
    if z.dtype != w.dtype:
        raise TypeError(f"TTT streaming: activations are {z.dtype} but the fast weight applies in {w.dtype}")
    if z.shape[0] == 1:
        return F.linear(z, w[0])
    return torch.bmm(z, w.transpose(1, 2))


def record_frame(state: TTTState, z: torch.Tensor, src: torch.Tensor) -> None:
    """Appends one frame to every executing item's current chunk. z [B, h], src [B, d] in the
    accumulation dtype, stored as they come (a non-finite chunk is detected and skipped by its fold).
    Graph-safe: no host reads, no branches on values, in-place updates only."""
    C = state.chunk_size
    room = state.pos < C
    ex = state.exec_mask & room
    state.lost.add_((state.exec_mask & ~room).long())
    row = torch.where(ex, state.pos, C) + state.row0  # [B]; idle / full items write their scratch row
    state.z_buf.view(-1, z.shape[-1]).index_copy_(0, row, z)
    state.s_buf.view(-1, src.shape[-1]).index_copy_(0, row, src)
    state.pos.add_(ex.long())


def stream_step(state: TTTState, z: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """The per-frame step: z [B, 1, h] (model dtype), src [B, 1, d] ⇒ the MLP output z · W⁽ⁱ⁾ᵀ
    [B, 1, d], and the frame recorded into the current chunk (see `record_frame`)."""
    out = apply_fast_weight(state, z)
    acc = state.w.dtype
    record_frame(state, z[:, 0].to(acc), src[:, 0].to(acc))
    return out


def due_items(state: TTTState) -> list[int]:
    """Items whose chunk is complete and not yet folded (reads the device: host-side use only)."""
    return (state.pos >= state.chunk_size).nonzero().flatten().tolist()


@torch.no_grad()
def fold(state: TTTState, items: tp.Sequence[int], cfg: TTTConfig) -> None:
    """Folds the completed chunk of each listed item into its fast weight and starts its next chunk:
    w += a · (c W_t)ᵀ Z with a = η · clip · finite. Items must have a complete chunk (`pos` = C);
    others are untouched. Host-driven, outside any captured step."""
    if not len(items):
        return
    C = state.chunk_size
    idx = torch.as_tensor(list(items), dtype=torch.long, device=state.w.device)
    zc, sc = state.z_buf[idx, :C], state.s_buf[idx, :C]  # [n, C, h], [n, C, d]
    cc = chunk_conv(sc, state.conv, C, state.past)  # [n, C, d]: the chunk's target conv
    finite = frame_finite(zc, sc, cc).all(-1)  # [n]: the parallel path's per-frame test, on the whole chunk
    zc = torch.where(finite[:, None, None], zc, 0.)
    cc = torch.where(finite[:, None, None], cc, 0.)
    vt = cc.transpose(1, 2) if state.w_t_rows is None else state.w_t_rows @ cc.transpose(1, 2)  # V̂ᵀ [n, d, C]
    sq = ((zc @ zc.transpose(1, 2)) * (vt.transpose(1, 2) @ vt)).sum((1, 2))
    norm = frobenius_from_gram(sq)
    ok = finite & torch.isfinite(norm)
    a = torch.full_like(norm, float(cfg.lr))
    clipped = torch.zeros_like(ok)
    if cfg.clip_norm is not None:
        clipped = ok & (norm > cfg.clip_norm)
        a = a * torch.where(clipped, cfg.clip_norm / torch.where(clipped, norm, 1.), 1.)
    a = torch.where(ok, a, 0.)
    va = torch.where(ok[:, None, None], vt * a[:, None, None], 0.)  # [n, d, C], finite
    for r, b in enumerate(items):
        state.w[b].addmm_(va[r], zc[r])
        if state.w_apply is not state.w:
            state.w_apply[b].copy_(state.w[b])
    state.last_norm[idx] = torch.where(a != 0, norm, 0.)
    state.updates[idx] += ok.long()
    state.clips[idx] += clipped.long()
    state.skipped[idx] += (~ok).long()
    state.pos[idx] = 0


@torch.no_grad()
def fast_weight_delta(state: TTTState) -> torch.Tensor:
    """W⁽ⁱ⁾ − W⁽⁰⁾ of every item, [B, d, h] (host-side telemetry / tests; not for the per-frame path)."""
    return state.w - state.base_weight().to(state.w.dtype)[None]

"""Streaming In-Place TTT: `TTTState`, the per-conversation fast weights of one layer, owns its updates.

Per item b it holds W⁽ⁱ⁾ (W⁽⁰⁾ plus the folded chunk deltas, in the state dtype: fp32, fp64 for fp64
models, or bf16, into which each fold rounds its fp32 ΔW) and the frames of the current chunk (fp32).
`step` is the per-frame work: apply W⁽ⁱ⁾ and record the frame; it is graph-safe (no host reads, no
branches on tensor values) and leaves exec-masked items unchanged. `fold` is the per-chunk work, run on
the host between steps for the items whose chunk completed (`due`). Invariant between two driver steps:
no item has a completed but unfolded chunk, so every frame of chunk i is computed with exactly W⁽ⁱ⁾.
`reset(mask)` returns items to W⁽⁰⁾; `snapshot`/`restore` carry one item's exact state. The design and
its costs are in docs/design.md ("Streaming state"); the bf16 state's precision in docs/capacity.md.
"""

from __future__ import annotations

import typing as tp

import torch
from moshi.modules.streaming import State
from torch.nn import functional as F

from moshi_ttt.ttt.chunk import chunk_conv, frame_finite, frobenius_from_gram
from moshi_ttt.ttt.config import TTTConfig

COUNTERS = ("updates", "clips", "skipped", "lost")
FOLD_ROWS = 512  # rows of W per block of a bf16 fold (its fp32 scratch: FOLD_ROWS × h, one per state)


class TTTState(State):
    """Per-conversation TTT state of one layer; per-item tensors have batch as first dim.

    w: [B, d, h] fast weight W⁽ⁱ⁾ in the state dtype (the accumulation dtype, or bf16).
    w_apply: [B, d, h] the weight `apply` multiplies by: `w` itself when the state dtype is the model
        dtype, else its copy in the model dtype, refreshed at every fold, reset and restore.
    z_buf: [B, C + 1, h], s_buf: [B, C + 1, d]: Z and the target source (X0 or the MLP input) of the
        current chunk's frames in rows 0..pos−1, as they came; row C is scratch, never read.
    pos: [B] frames in the current chunk (C: complete, waiting for its fold).
    last_norm: [B] ‖V̂ᵀZ‖_F of the last folded chunk (0 if it was skipped or η = 0).
    updates / clips / skipped / lost: [B] counters (lost: frames that arrived before a due fold).
    w0: W⁽⁰⁾ [d, h] in the model dtype, shared by all items (fixed while streaming).
    w_t_rows: W_targetᵀ [d, d] in the accumulation dtype, contiguous (None without W_target).
    conv: the target conv weight [d, 1, K] in the accumulation dtype (None: no conv), seeing `past`
        past frames.
    row0: [B] b·(C + 1), item b's first row in the flattened buffers [B·(C + 1), ·].
    host_folds: a driver folds after each step (`TTTLMGen`); otherwise the layer folds itself.
    factors: None, or per item the log of its folded chunks as factors (see `keep_factors`).
    stochastic: a fold into a bf16 `w` rounds stochastically, the noise of an item's k-th fold (k =
        updates + skipped before it) drawn from `rounding_seed` and k only.
    """

    def __init__(self, batch_size: int, chunk: int, w0: torch.Tensor, acc_dtype: torch.dtype,
                 w_target: torch.Tensor | None = None, conv_weight: torch.Tensor | None = None, past: int = 0,
                 state_dtype: torch.dtype | None = None, stochastic: bool = False, rounding_seed: int = 0):
        """w0 [d, h] gives the device, the shapes and the apply dtype; w_target [d, d] (None: identity);
        conv_weight [d, 1, K] (None: no conv) seeing `past` past frames. All are detached, not copied
        (w0 is kept as given: pass a tensor that stays W⁽⁰⁾ while streaming). `state_dtype` is w's dtype
        (None: `acc_dtype`; else acc_dtype or bf16); `stochastic` and `rounding_seed` apply to a bf16 w."""
        if w0.dim() != 2:
            raise ValueError(f"TTTState: W⁽⁰⁾ must be [d, h], got shape {tuple(w0.shape)}")
        if chunk < 1:
            raise ValueError(f"TTTState: chunk must be ≥ 1, got {chunk}")
        super().__init__(batch_size, torch.device(w0.device))
        w0 = w0.detach()
        (d, h), device = w0.shape, w0.device

        def z(*shape, dt=acc_dtype):
            return torch.zeros(*shape, device=device, dtype=dt)
        state_dtype = acc_dtype if state_dtype is None else state_dtype
        if state_dtype not in (acc_dtype, torch.bfloat16):
            raise ValueError(f"TTTState: state dtype {state_dtype} must be the accumulation dtype {acc_dtype} "
                             f"or torch.bfloat16")
        if state_dtype == torch.bfloat16 and acc_dtype != torch.float32:
            raise ValueError(f"TTTState: a bfloat16 state folds in float32, not in the accumulation dtype "
                             f"{acc_dtype} (use the float32 state with this model)")
        self.w0 = w0
        self.w = w0.to(state_dtype)[None].repeat(batch_size, 1, 1)
        self.w_apply = self.w if w0.dtype == state_dtype else self.w.to(w0.dtype)
        self.stochastic = bool(stochastic) and state_dtype == torch.bfloat16 != acc_dtype
        self.rounding_seed = int(rounding_seed)
        self.z_buf, self.s_buf = z(batch_size, chunk + 1, h), z(batch_size, chunk + 1, d)
        self.pos = z(batch_size, dt=torch.long)
        self.last_norm = z(batch_size)
        self.updates, self.clips, self.skipped, self.lost = (z(batch_size, dt=torch.long) for _ in COUNTERS)
        self.w_t_rows = None if w_target is None else w_target.detach().T.to(acc_dtype).contiguous()
        self.conv = None if conv_weight is None else conv_weight.detach().to(acc_dtype).contiguous()
        self.past = past
        self.host_folds = False
        self.factors: list[list[tuple[torch.Tensor, torch.Tensor]] | None] | None = None
        self.factor_limit: int | None = None
        self._wide = self._bits = None  # a bf16 fold's scratch blocks, made by its first fold
        self.row0 = torch.arange(batch_size, device=device) * (chunk + 1)

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

    @property
    def chunk_size(self) -> int:
        return self.z_buf.shape[1] - 1

    @property
    def bytes(self) -> int:
        """Bytes of per-conversation state (all items / batch)."""
        return sum(t.numel() * t.element_size() for t in self.tensors(scratch=True).values()) // self.batch_size

    # -- the per-frame step (graph-safe) ----------------------------------------------------------

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, T, h] (model dtype) ⇒ z · W⁽ⁱ⁾ᵀ [B, T, d], each item with its own fast weight.

        B = 1 goes through the same `F.linear` kernel as moshi's `linear_out`, so while W⁽ⁱ⁾ = W⁽⁰⁾ the
        result is bitwise the base MLP's. (B is a shape: this branch is fixed at capture time.)"""
        w = self.w_apply
        if z.dtype != w.dtype:
            raise TypeError(f"TTT streaming: activations are {z.dtype} but the fast weight applies in {w.dtype}")
        if z.shape[0] == 1:
            return F.linear(z, w[0])
        return torch.bmm(z, w.transpose(1, 2))

    def record(self, z: torch.Tensor, src: torch.Tensor) -> None:
        """Appends one frame to every executing item's current chunk. z [B, h], src [B, d] in the
        accumulation dtype, stored as they come (a non-finite chunk is detected and skipped by its fold).
        An item that is exec-masked or whose chunk is full writes its scratch row instead."""
        C = self.chunk_size
        room = self.pos < C
        ex = self.exec_mask & room
        self.lost.add_((self.exec_mask & ~room).long())
        row = torch.where(ex, self.pos, C) + self.row0  # [B]
        self.z_buf.view(-1, z.shape[-1]).index_copy_(0, row, z)
        self.s_buf.view(-1, src.shape[-1]).index_copy_(0, row, src)
        self.pos.add_(ex.long())

    def step(self, z: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """The per-frame step: z [B, 1, h] (model dtype), src [B, 1, d] ⇒ the MLP output z · W⁽ⁱ⁾ᵀ
        [B, 1, d], and the frame recorded into the current chunk (see `record`)."""
        out = self.apply(z)
        acc = self.z_buf.dtype
        self.record(z[:, 0].to(acc), src[:, 0].to(acc))
        return out

    # -- host side, between steps -----------------------------------------------------------------

    def due(self) -> list[int]:
        """Items whose chunk is complete and not yet folded (reads the device: host-side use only)."""
        return (self.pos >= self.chunk_size).nonzero().flatten().tolist()

    @torch.no_grad()
    def fold(self, items: tp.Sequence[int], cfg: TTTConfig) -> None:
        """Folds the completed chunk of each listed item into its fast weight and starts its next chunk:
        w += a · (c W_t)ᵀ Z with a = η · clip · finite (`chunk_update`), ΔW in the accumulation dtype (a bf16 w
        gets w + ΔW rounded once, see `stochastic`). Items must have a complete chunk (`pos` = C); others are
        untouched. With `factors` on, each fold's (a·V̂ [C, d], Z [C, h]) is logged."""
        if not len(items):
            return
        C = self.chunk_size
        idx = torch.as_tensor(list(items), dtype=torch.long, device=self.w.device)
        folds = (self.updates[idx] + self.skipped[idx]).tolist() if self.stochastic else []
        va, zc, norm, a, ok, clipped = chunk_update(self.z_buf[idx, :C], self.s_buf[idx, :C], self, cfg)
        for r, b in enumerate(items):
            if self.w.dtype == va.dtype:
                self.w[b].addmm_(va[r], zc[r])
                if self.w_apply is not self.w:
                    self.w_apply[b].copy_(self.w[b])
            else:
                self._fold_bf16(b, va[r], zc[r], folds[r] if folds else None)
            self.log_factors(b, va[r], zc[r])
        self.last_norm[idx] = torch.where(a != 0, norm, 0.)
        self.updates[idx] += ok.long()
        self.clips[idx] += clipped.long()
        self.skipped[idx] += (~ok).long()
        self.pos[idx] = 0

    # -- the factor log (opt-in, host side: conversation memory) ---------------------------------

    def keep_factors(self, enabled: bool = True, max_values: int | None = None) -> None:
        """Starts (or stops) logging every item's folded chunks as factors: `factors[b]` is a list of
        (a·V̂ [L, d], Z [L, h]) whose Σ (a·V̂)ᵀ Z is W⁽ⁱ⁾ − W⁽⁰⁾, or None once that log would hold
        `max_values` values (default: the d×h delta's) or more (or after a `restore`, whose history is
        unknown). Reset empties it."""
        if max_values is not None and max_values < 0:
            raise ValueError(f"TTTState.keep_factors: max_values must be >= 0, got {max_values!r}")
        self.factors = [[] for _ in range(self.batch_size)] if enabled else None
        self.factor_limit = max_values

    def log_factors(self, item: int, va: torch.Tensor, z: torch.Tensor) -> None:
        """Appends one folded chunk (va [d, L] = a·V̂ᵀ, z [L, h]) to item's log, if it keeps one."""
        log = None if self.factors is None else self.factors[item]
        if log is None:
            return
        d, h = self.w.shape[1:]
        limit = d * h if self.factor_limit is None else self.factor_limit
        if (sum(f[1].shape[0] for f in log) + z.shape[0]) * (d + h) >= limit:
            self.factors[item] = None
            return
        log.append((va.T.clone(), z.clone()))

    def _fold_bf16(self, b: int, va: torch.Tensor, zc: torch.Tensor, fold: int | None) -> None:
        """w[b] ← round(w[b] + va · zc) with the sum in fp32, by blocks of `FOLD_ROWS` rows through one
        reused fp32 scratch block (no d×h fp32 temporary); stochastic with the bits of fold number `fold`.
        A separate apply copy is refreshed block by block from the rounded rows (the same values as a
        whole-matrix copy afterwards, while the block is still in cache)."""
        w = self.w[b]
        w_apply = None if self.w_apply is self.w else self.w_apply[b]
        d, h = w.shape
        if self._wide is None:
            self._wide = torch.empty(min(d, FOLD_ROWS), h, dtype=va.dtype, device=w.device)
            self._bits = torch.empty(self._wide.shape, dtype=torch.int32, device=w.device) if self.stochastic else None
        bits = None if fold is None else rounding_bits(self.rounding_seed, fold, d, h, w.device)
        for i in range(0, d, FOLD_ROWS):
            rows = slice(i, min(i + FOLD_ROWS, d))
            n = rows.stop - i
            wide = self._wide[:n].copy_(w[rows])
            wide.addmm_(va[rows], zc)
            if bits is not None:
                stochastic_round_(wide, bits[0][rows], bits[1], self._bits[:n])
            w[rows].copy_(wide)
            if w_apply is not None:
                w_apply[rows].copy_(w[rows])

    def reset(self, reset_mask: torch.Tensor) -> None:
        """Restores exactly the masked items to W⁽⁰⁾ with an empty chunk; others are untouched.
        Host-driven (moshi calls it eagerly, never inside a captured step)."""
        super().reset(reset_mask)
        m = reset_mask.to(self.w.device, torch.bool)
        for k, t in self.tensors(scratch=True).items():
            if k not in ("w", "w_apply"):
                t.masked_fill_(m.view(-1, *([1] * (t.dim() - 1))), 0)
        for b in m.nonzero().flatten().tolist():
            self.w[b].copy_(self.w0)
            if self.w_apply is not self.w:
                self.w_apply[b].copy_(self.w[b])
            if self.factors is not None:
                self.factors[b] = []

    @torch.no_grad()
    def delta(self) -> torch.Tensor:
        """W⁽ⁱ⁾ − W⁽⁰⁾ of every item, [B, d, h] (telemetry / tests; not for the per-frame path)."""
        acc = self.z_buf.dtype
        return self.w.to(acc) - self.w0.to(acc)[None]

    def snapshot(self, item: int) -> dict[str, torch.Tensor]:
        """Item `item`'s exact state, cloned on the state's device: `w` (W⁽ⁱ⁾ itself, so that restoring is
        bitwise), the current chunk's rows `z_buf` [C, h] and `s_buf` [C, d], `pos`, `last_norm` and the
        counters. Fixed shapes, no host read. `restore` takes it back, into any item of a state of the
        same layer (same W⁽⁰⁾, shapes and dtypes)."""
        b = self._item(item)
        return {k: v[b].clone() for k, v in self.tensors().items() if k != "w_apply"}

    def restore(self, item: int, snapshot: tp.Mapping[str, torch.Tensor]) -> None:
        """Makes item `item` continue exactly as the item `snapshot` was taken from (see `snapshot`);
        other items are untouched. Host-driven, between steps; the exec mask is left to the host."""
        b = self._item(item)
        dst = {k: v[b] for k, v in self.tensors().items() if k != "w_apply"}
        if set(snapshot) != set(dst):
            raise ValueError(f"TTT snapshot has keys {sorted(snapshot)}, this state needs {sorted(dst)}")
        for k, t in dst.items():
            s = snapshot[k]
            if s.shape != t.shape or s.dtype != t.dtype:
                raise ValueError(f"TTT snapshot {k!r} is {tuple(s.shape)} {s.dtype}, this state holds "
                                 f"{tuple(t.shape)} {t.dtype}")
            t.copy_(s)
        if self.w_apply is not self.w:
            self.w_apply[b].copy_(self.w[b])
        if self.factors is not None:
            self.factors[b] = None

    def _item(self, item: int) -> int:
        if not 0 <= item < self.batch_size:
            raise IndexError(f"TTT state item {item} out of range for a batch of {self.batch_size}")
        return int(item)


@torch.no_grad()
def chunk_update(zc: torch.Tensor, sc: torch.Tensor, state: TTTState, cfg: TTTConfig
                 ) -> tuple[torch.Tensor, ...]:
    """The update of one chunk of L frames per row, in the accumulation dtype: zc [n, L, h] and sc [n, L, d]
    (the sources) ⇒ (va [n, d, L] = a·V̂ᵀ, Z [n, L, h] zeroed if non-finite, ‖V̂ᵀZ‖_F [n], a [n], ok [n], clipped [n])
    with ΔW = va @ Z. The conv sees only the L frames (`chunk_conv` with chunk L): L < C is the short chunk
    that ends a conversation, as the parallel path confines the conv to a ragged last chunk. The state gives
    the layer's constants (conv taps, W_targetᵀ, past frames)."""
    cc = chunk_conv(sc, state.conv, sc.shape[1], state.past)  # [n, L, d]: the chunk's target conv
    finite = frame_finite(zc, sc, cc).all(-1)  # [n]: the parallel path's per-frame test, on the whole chunk
    zc = torch.where(finite[:, None, None], zc, 0.)
    cc = torch.where(finite[:, None, None], cc, 0.)
    vt = cc.transpose(1, 2) if state.w_t_rows is None else state.w_t_rows @ cc.transpose(1, 2)  # V̂ᵀ [n, d, L]
    sq = ((zc @ zc.transpose(1, 2)) * (vt.transpose(1, 2) @ vt)).sum((1, 2))
    norm = frobenius_from_gram(sq)
    ok = finite & torch.isfinite(norm)
    a = torch.full_like(norm, float(cfg.lr))
    clipped = torch.zeros_like(ok)
    if cfg.clip_norm is not None:
        clipped = ok & (norm > cfg.clip_norm)
        a = a * torch.where(clipped, cfg.clip_norm / torch.where(clipped, norm, 1.), 1.)
    a = torch.where(ok, a, 0.)
    va = torch.where(ok[:, None, None], vt * a[:, None, None], 0.)  # [n, d, L], finite
    return va, zc, norm, a, ok, clipped


def rounding_bits(seed: int, step: int, m: int, n: int, device: torch.device | str = "cpu"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The stochastic-rounding bits of an [m, n] matrix: r [m, 1], s [1, n], uniform 16-bit draws of a
    generator seeded with (seed, step) only. Entry (i, j) gets r_i XOR s_j: uniform and pairwise
    independent over entries, at the cost of m + n draws (docs/capacity.md)."""
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + int(step)) % 2**63)
    bits = torch.randint(0, 1 << 16, (m + n,), generator=g, device=device, dtype=torch.int32)
    return bits[:m, None], bits[None, m:]


def stochastic_round_(x: torch.Tensor, r: torch.Tensor, s: torch.Tensor, scratch: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """Prepares fp32 x [m, n] in place for a stochastic rounding to bf16 with the bits r [m, 1], s [1, n]
    of `rounding_bits`: adds r_i XOR s_j below each value's bf16 mantissa and clears those 16 bits, so
    that x.to(bfloat16) is then exact and is each value's upper neighbour (in magnitude) with probability
    proportional to closeness: unbiased, E[round(x)] = x. Infinities and NaNs stay as they are. `scratch`:
    an int32 tensor of x's shape for the bits (None: allocated). Returns x."""
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_ takes float32 values, got {x.dtype}")
    xi = x.view(torch.int32)
    xi.add_(torch.bitwise_xor(r, s) if scratch is None else torch.bitwise_xor(r, s, out=scratch))
    xi.bitwise_and_(-65536)  # an inf/NaN pattern keeps its exponent and top mantissa bits: stays inf/NaN
    return x

"""Per-step TTT diagnostics: gradient norms, slow-parameter drift, and fast-weight drift.

Fast-weight drift of one training forward (parallel path), per TTT layer, averaged over the batch:
  fast_drift      ‖W⁽ⁿ⁻¹⁾ − W⁽⁰⁾‖_F = ‖Σ_{j<n-1} a_j ΔW_j‖, the fast-weight change the segment's last chunk
                  is computed with (a_j = η·clip·finite, n chunks);
  last_delta      ‖ΔW_last‖_F, the raw update of the segment's last chunk (as `infer`'s last_delta_norm).
Computed by a forward hook from the layer's inputs with `moshi_ttt.ttt.chunk` (chunk-confined conv, coefficients).
"""

from __future__ import annotations

import torch

from moshi_ttt.models.lm import TTTLMModel
from moshi_ttt.modules.gating import TTTGating
from moshi_ttt.modules.transformer import TTT_KEY
from moshi_ttt.ttt.chunk import chunk_coefficients, chunk_conv, frame_finite


def grad_norm(tensors: list[torch.Tensor]) -> float:
    gs = [t.grad.detach().double().norm() for t in tensors if t.grad is not None]
    return float(torch.stack(gs).norm()) if gs else 0.0


class FastWeightProbe:
    """Forward hooks on every TTTGating recording fast-weight drift of the last forward."""

    def __init__(self, model: TTTLMModel):
        self.values: dict[int, dict[str, float]] = {}
        self._handles = [g.register_forward_hook(self._hook(i)) for i, g in model.ttt_gatings().items()]

    def _hook(self, index: int):
        def hook(module: TTTGating, args, output):
            if module.is_streaming or len(args) < 1:
                return
            x = args[0]
            x0 = args[1] if len(args) > 1 else None
            with torch.no_grad():
                self.values[index] = fast_weight_stats(module, x, x0)
        return hook

    def pop(self) -> dict[int, dict[str, float]]:
        v, self.values = self.values, {}
        return v

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@torch.no_grad()
def fast_weight_stats(g: TTTGating, x: torch.Tensor, x0: torch.Tensor | None) -> dict[str, float]:
    cfg = g.cfg
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = g.activations(x).to(acc)
    src = g._src(x, x0).to(acc)
    B, T, h = z.shape
    C = cfg.chunk_size
    conv_w = g.ttt.conv_weight
    w_t = g.ttt.w_target
    c = chunk_conv(src, conv_w, C, cfg.past_frames)
    coef, _, _ = chunk_coefficients(z, c, frame_finite(z, src, c), w_t, cfg)  # [B, n]
    frame_coef = coef.repeat_interleave(C, dim=1)[:, :T]
    last = (len(coef[0]) - 1) * C
    drift, delta = [], []
    for b in range(B):
        ok = (frame_coef[b] != 0) & (torch.arange(T, device=z.device) < last)
        m = (torch.where(ok[:, None], c[b] * frame_coef[b, :, None], 0.)).T @ torch.where(ok[:, None], z[b], 0.)
        d = c[b, last:].T @ z[b, last:]
        if w_t is not None:
            m = w_t.to(acc).T @ m
            d = w_t.to(acc).T @ d
        drift.append(torch.linalg.matrix_norm(m))
        delta.append(torch.linalg.matrix_norm(d))
    return {"fast_drift": float(torch.stack(drift).mean()), "last_delta": float(torch.stack(delta).mean())}


def ttt_layer_params(model: TTTLMModel) -> dict[int, list[tuple[str, torch.nn.Parameter]]]:
    out: dict[int, list] = {i: [] for i in model.ttt_layer_indices}
    for n, p in model.named_parameters():
        if TTT_KEY in n:
            out[int(n.split(".")[2])].append((n, p))
    return out

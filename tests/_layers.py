"""The small TTT layer of the layer tests (tests/{ttt,modules}/): d = 16, dim_feedforward 60 ⇒ h = 40, C = 8,
and a helper that streams it in calls of given sizes. Imported as `from _layers import ...` (pyproject's
pytest `pythonpath` puts tests/ on sys.path)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

LAYER_DIM, LAYER_FF, LAYER_CHUNK = 16, 60, 8


def make_ttt_layer(dtype=torch.float64, perturb=True, seed=0, **cfg_kw):
    """A TTTGating (d=16, h=40) with `chunk_size=8, lr=0.05, init="ntp"` unless overridden in cfg_kw.
    perturb=True adds random noise to the target params (conv, W_target) so no test relies on the
    special structure of the `ntp` init."""
    from moshi_ttt.modules.gating import TTTGating
    from moshi_ttt.ttt.config import TTTConfig

    torch.manual_seed(seed)
    cfg = TTTConfig(**{"chunk_size": LAYER_CHUNK, "lr": 0.05, "init": "ntp", **cfg_kw})
    g = TTTGating(LAYER_DIM, LAYER_FF, F.silu, cfg, dtype=dtype)
    if perturb:
        with torch.no_grad():
            if g.ttt.conv is not None:
                g.ttt.conv.weight.add_(0.2 * torch.randn_like(g.ttt.conv.weight))
            if g.ttt.w_target is not None:
                g.ttt.w_target.add_(0.1 * torch.randn_like(g.ttt.w_target))
    return g


def stream_calls(g, x, x0, sizes):
    """Feeds x, x0 [B, T, d] to a streaming layer in calls of `sizes` frames; returns [B, T, d]. Call inside
    `with layer.streaming(B):`."""
    assert sum(sizes) == x.shape[1]
    outs, t = [], 0
    for s in sizes:
        outs.append(g(x[:, t:t + s], x0[:, t:t + s]))
        t += s
    return torch.cat(outs, dim=1)

"""The three implementations of the In-Place TTT gated MLP compute the same function, and the layer
is a drop-in replacement of moshi's ActivationGating.

naive reference (Algorithm 1, explicit fast weight) = parallel path (chunk-causal attention form)
= streaming path (per-conversation fast weights folded per chunk, any number of frames per call).
"""

import dataclasses

import pytest
import torch
from moshi.modules.gating import ActivationGating
from torch.nn import functional as F

from moshi_ttt.modules.gating import TTTGating
from moshi_ttt.ttt.chunk import chunk_conv
from moshi_ttt.ttt.config import TTTConfig
from moshi_ttt.ttt.naive import naive_ttt_mlp

from _layers import LAYER_CHUNK as C
from _layers import LAYER_DIM as D
from _layers import LAYER_FF as FF
from _layers import make_ttt_layer, stream_calls

B = 2
T = 3 * C + 5  # three whole chunks and a ragged last chunk
WHOLE = (T // C) * C
SIZES = [3, 7, 1, 10, 2, 6]  # calls crossing the boundaries at 8, 16 and 24
pytestmark = pytest.mark.usefixtures("torch_single_thread")

DTYPES = [pytest.param(torch.float64, 1e-9, id="f64"), pytest.param(torch.float32, 1e-5, id="f32")]


def _src(g, x, x0):
    return x if g.cfg.target == "mlp_input" else x0


def _reference(g, x, x0):
    """(output, fast weight delta W − W⁽⁰⁾ [B, d, h]) of the naive reference."""
    with torch.no_grad():
        z = g.activations(x)
        w0 = g.linear_out.weight
        out, w = naive_ttt_mlp(z, _src(g, x, x0), w0, g.ttt.conv_weight, g.ttt.w_target, g.cfg)
    return out, w - w0.to(w.dtype)


def _raw_chunk_norms(g, x, x0):
    """‖V̂_jᵀ Z_j‖_F of every whole chunk of every item (before η / clip), computed from the definition."""
    with torch.no_grad():
        z = g.activations(x)
        c = chunk_conv(_src(g, x, x0), g.ttt.conv_weight, C, g.cfg.past_frames)
        v = c if g.ttt.w_target is None else c @ g.ttt.w_target
        return torch.stack([torch.linalg.matrix_norm(v[:, s:s + C].transpose(1, 2) @ z[:, s:s + C])
                            for s in range(0, WHOLE, C)], dim=1)


def _with_cfg(g, **changes):
    """Same parameters, config with `changes`."""
    new = TTTGating(D, FF, F.silu, dataclasses.replace(g.cfg, **changes), dtype=g.linear_out.weight.dtype)
    new.load_state_dict(g.state_dict())
    return new


def _close(a, b, tol):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


VARIANTS = {
    "ntp": dict(perturb=False),
    "random": dict(),
    "mlp_input": dict(target="mlp_input"),
    "no_conv": dict(use_conv=False),
    "no_target_proj": dict(use_target_proj=False),
}


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reference_parallel_streaming_agree(variant, clip, dtype, tol):
    kw = dict(VARIANTS[variant])
    g = make_ttt_layer(dtype=dtype, perturb=kw.pop("perturb", True), **kw)
    x = torch.randn(B, T, D, dtype=dtype)
    x0 = torch.randn(B, T, D, dtype=dtype)
    if clip:
        # τ between the raw norms of the whole chunks: some chunks are clipped, some are not.
        norms = _raw_chunk_norms(g, x, x0).flatten().sort().values
        mid = len(norms) // 2
        g = _with_cfg(g, clip_norm=float(norms[mid - 1] + norms[mid]) / 2)

    ref, _ = _reference(g, x, x0)
    _, ref_w_whole = _reference(g, x[:, :WHOLE], x0[:, :WHOLE])
    base = g.linear_out(g.activations(x)).detach()
    assert (ref - base).abs().max() > 1e-3, "TTT term is negligible: the comparison would be vacuous"

    with torch.no_grad():
        par = g(x, x0)
    _close(par, ref, tol)

    for sizes in ([1] * T, SIZES):
        with torch.no_grad(), g.streaming(B):
            out = stream_calls(g, x, x0, sizes)
            # The ragged last chunk is not applied while streaming (it has not completed), and 5 frames
            # of chunk 2 are folded while 3 are pending: W − W⁽⁰⁾ = reference after the whole chunks.
            delta = g.fast_weight_delta()
            tel = g.telemetry()
        _close(out, ref, tol)
        _close(delta, ref_w_whole, tol)
        assert torch.equal(tel["updates"], torch.full((B,), T // C))
        if clip:
            assert tel["clips"].sum() > 0
            assert tel["clips"].sum() < tel["updates"].sum()
        else:
            assert tel["clips"].sum() == 0

    # Exactly at a chunk boundary (the last chunk's delta not folded at all yet).
    with torch.no_grad(), g.streaming(B):
        stream_calls(g, x[:, :WHOLE], x0[:, :WHOLE], [1] * WHOLE)
        _close(g.fast_weight_delta(), ref_w_whole, tol)


@pytest.mark.parametrize("future", [0, 1, 2])
def test_chunk_conv_matches_definition(future):
    """out[t] = Σ_k w[:, 0, k] ⊙ src[t − past + k], zero outside t's chunk; the `ntp` init picks src[t+1]."""
    torch.manual_seed(1)
    K, T2 = 3, 2 * C + 3
    past = K - 1 - future
    src = torch.randn(B, T2, D, dtype=torch.float64)
    w = torch.randn(D, 1, K, dtype=torch.float64)
    want = torch.zeros_like(src)
    for t in range(T2):
        for k in range(K):
            s = t - past + k
            if 0 <= s < T2 and s // C == t // C:
                want[:, t] += w[:, 0, k] * src[:, s]
    torch.testing.assert_close(chunk_conv(src, w, C, past), want, rtol=1e-12, atol=1e-12)

    if future >= 1:
        g = TTTGating(D, FF, F.silu, TTTConfig(chunk_size=C, kernel_size=K, future_frames=future, init="ntp"),
                      dtype=torch.float64)
        c = chunk_conv(src, g.ttt.conv_weight, C, g.cfg.past_frames)
        nxt = torch.cat([src[:, 1:], torch.zeros_like(src[:, :1])], dim=1)
        nxt[:, C - 1::C] = 0  # the last frame of a chunk has no next frame inside its chunk
        assert torch.equal(c, nxt)


CASES = {  # (init, η, perturb target params)
    "zero_lr0.7": ("zero", 0.7, False),
    "zero_lr0.7_clip": ("zero", 0.7, False),
    "ntp_lr0": ("ntp", 0.0, False),
    "random_lr0": ("ntp", 0.0, True),
}


@pytest.mark.parametrize("path", ["parallel", "streaming_b1", "streaming"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_drop_in_equal_to_moshi_gating(case, dtype, path):
    """With V̂ = 0 (zero init, or η = 0) the layer is moshi's gating. Bitwise for the parallel path and for
    the streaming path at B = 1, one frame per call (how LMGen drives a single conversation): the
    down-projection is the same `F.linear` kernel with W⁽ⁱ⁾ = W⁽⁰⁾. With B > 1 every conversation has its
    own fast weight, applied by a batched matmul whose summation order differs from moshi's single GEMM:
    ≤ 1e-6 relative in fp32, one bf16 rounding step in bf16."""
    init, lr, perturb = CASES[case]
    torch.manual_seed(2)
    base = ActivationGating(D, FF, F.silu, dtype=dtype)
    cfg = TTTConfig(chunk_size=C, lr=lr, init=init, clip_norm=0.1 if case.endswith("clip") else None)
    g = TTTGating(D, FF, F.silu, cfg, dtype=dtype)
    g.load_state_dict(base.state_dict(), strict=False)
    if perturb:
        with torch.no_grad():
            g.ttt.conv.weight.add_(torch.randn_like(g.ttt.conv.weight))
            g.ttt.w_target.add_(torch.randn_like(g.ttt.w_target))
    nb = 1 if path == "streaming_b1" else B
    x = torch.randn(nb, T, D, dtype=dtype)
    x0 = torch.randn(nb, T, D, dtype=dtype)
    with torch.no_grad():
        if path == "parallel":
            assert torch.equal(g(x, x0), base(x))
            return
        sizes = [1] * T if path == "streaming_b1" else SIZES + [1] * 4
        with g.streaming(nb):
            t = 0
            for s in sizes:
                if t + s > T:
                    break
                got, want = g(x[:, t:t + s], x0[:, t:t + s]), base(x[:, t:t + s])
                if path == "streaming_b1":
                    assert torch.equal(got, want), t
                else:
                    tol = 1e-6 if dtype == torch.float32 else 2 ** -8
                    err = float((got.float() - want.float()).abs().max())
                    assert err <= tol * float(want.float().abs().max()), (t, err)
                t += s
            assert int(g.telemetry()["updates"].min()) == T // C
            assert float(g.telemetry()["drift"].max()) == 0


def test_moshi_gating_state_dict_loads_with_only_ttt_keys_missing():
    torch.manual_seed(3)
    base = ActivationGating(D, FF, F.silu)
    cfg = TTTConfig(chunk_size=C, init="ntp")
    g = TTTGating(D, FF, F.silu, cfg)
    res = g.load_state_dict(base.state_dict(), strict=False)
    assert set(res.missing_keys) == {"ttt.conv.weight", "ttt.w_target"}
    assert res.unexpected_keys == []
    for k, v in base.state_dict().items():
        assert torch.equal(g.state_dict()[k], v)
    # ...so the base keys load strictly, and the reverse direction is strict too.
    g.load_state_dict({**base.state_dict(), **{k: v for k, v in g.state_dict().items() if k.startswith("ttt.")}})
    base2 = ActivationGating(D, FF, F.silu)
    base2.load_state_dict({k: v for k, v in g.state_dict().items() if not k.startswith("ttt.")})
    # from_gating wraps the very same modules (no copy).
    w = TTTGating.from_gating(base, cfg)
    assert w.linear_in is base.linear_in and w.linear_out is base.linear_out
    x, x0 = torch.randn(B, T, D), torch.randn(B, T, D)
    with torch.no_grad():
        assert torch.equal(w(x, x0), TTTGating.from_gating(base2, cfg)(x, x0))


@pytest.mark.parametrize("use_conv,use_target_proj", [(True, False), (False, True)], ids=["noproj", "noconv"])
def test_zero_init_is_base_mlp_in_each_ablation(use_conv, use_target_proj):
    """`zero` init means V̂ = 0 in every ablation that can express it (without conv: W_target = 0)."""
    torch.manual_seed(4)
    base = ActivationGating(D, FF, F.silu)
    cfg = TTTConfig(chunk_size=C, lr=0.9, init="zero", use_conv=use_conv, use_target_proj=use_target_proj)
    g = TTTGating(D, FF, F.silu, cfg)
    g.load_state_dict(base.state_dict(), strict=False)
    x, x0 = torch.randn(B, T, D), torch.randn(B, T, D)
    with torch.no_grad():
        assert torch.equal(g(x, x0), base(x))
    with pytest.raises(ValueError, match="init"):
        TTTConfig(init="zero", use_conv=False, use_target_proj=False)

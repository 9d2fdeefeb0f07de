"""Streaming semantics of the TTT layer: chunk confinement (no future leaks into an update), per-item
phases / resets / exec masks in a batch, delta clipping, and skipping of non-finite chunks."""

import pytest
import torch

from moshi_ttt.ttt.naive import naive_ttt_mlp

from _layers import LAYER_CHUNK as C
from _layers import LAYER_DIM as D
from _layers import make_ttt_layer, stream_calls

pytestmark = pytest.mark.usefixtures("torch_single_thread")

F64 = torch.float64


def _run(g, x, x0, path):
    with torch.no_grad():
        if path == "parallel":
            return g(x, x0)
        with g.streaming(x.shape[0]):
            return torch.cat([g(x[:, t:t + 1], x0[:, t:t + 1]) for t in range(x.shape[1])], dim=1)


# -- chunk confinement ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["parallel", "streaming"])
@pytest.mark.parametrize("p", [C, C + 3, 2 * C - 1], ids=["chunk_start", "mid", "chunk_end"])
def test_x0_perturbation_only_reaches_later_chunks(p, path):
    """X0 at frame p enters only ΔW of chunk(p), used from chunk(p)+1 on. With a centred kernel, frame
    p = first of its chunk would reach chunk(p)-1's target if the conv crossed chunk edges."""
    g = make_ttt_layer(dtype=F64, kernel_size=5, future_frames=2)
    T = 4 * C + 3
    x = torch.randn(2, T, D, dtype=F64)
    x0 = torch.randn(2, T, D, dtype=F64)
    x0b = x0.clone()
    x0b[:, p] += torch.randn(2, D, dtype=F64)
    a, b = _run(g, x, x0, path), _run(g, x, x0b, path)
    end = (p // C + 1) * C
    assert torch.equal(a[:, :end], b[:, :end])
    assert (a[:, end:end + C] - b[:, end:end + C]).abs().max() > 1e-6


@pytest.mark.parametrize("path", ["parallel", "streaming"])
@pytest.mark.parametrize("target", ["x0", "mlp_input"])
def test_x_perturbation_reaches_own_frame_and_later_chunks_only(target, path):
    g = make_ttt_layer(dtype=F64, target=target)
    T, p = 4 * C + 3, C + 3
    x = torch.randn(2, T, D, dtype=F64)
    x0 = torch.randn(2, T, D, dtype=F64)
    xb = x.clone()
    xb[:, p] += torch.randn(2, D, dtype=F64)
    a, b = _run(g, x, x0, path), _run(g, xb, x0, path)
    end = (p // C + 1) * C
    same = [t for t in range(end) if t != p]
    assert torch.equal(a[:, same], b[:, same])
    assert (a[:, p] - b[:, p]).abs().min() > 0
    assert (a[:, end:end + C] - b[:, end:end + C]).abs().max() > 1e-6


# -- batches: phases, resets, exec masks ----------------------------------------------------------


@pytest.mark.parametrize("clip", [None, 0.3])
def test_batch_with_phases_and_reset_equals_items_alone(clip):
    """B=3 items starting at different steps (exec-masked before), item 1 reset mid-chunk (after three
    folded chunks): each item's outputs on its executed steps and its fast weight equal running
    it alone (the reset item: up to the reset, then a fresh run)."""
    g = make_ttt_layer(dtype=F64, clip_norm=clip)
    B, N = 3, 46
    starts, r = [0, 3, 11], 30  # item 1 has executed 27 frames at the reset: 3 chunks + 3
    x = torch.randn(B, N, D, dtype=F64)
    x0 = torch.randn(B, N, D, dtype=F64)
    outs = torch.zeros(B, N, D, dtype=F64)
    with torch.no_grad(), g.streaming(B):
        for t in range(N):
            if t == r:
                before_reset = g.fast_weight_delta()[1].clone()
                g.reset_streaming(torch.tensor([False, True, False]))
            g.set_exec_mask(torch.tensor([t >= s for s in starts]))
            outs[:, t] = g(x[:, t:t + 1], x0[:, t:t + 1])[:, 0]
        final = g.fast_weight_delta()
        tel = g.telemetry()
    if clip is not None:
        assert tel["clips"].sum() > 0

    def alone(k, s, e):
        with torch.no_grad(), g.streaming(1):
            return g(x[k:k + 1, s:e], x0[k:k + 1, s:e])[0], g.fast_weight_delta()[0]

    for k, segments in [(0, [(0, N)]), (1, [(3, r), (r, N)]), (2, [(11, N)])]:
        for s, e in segments:
            out, delta = alone(k, s, e)
            torch.testing.assert_close(outs[k, s:e], out, rtol=1e-9, atol=1e-9)
            want = before_reset if (k, e) == (1, r) else final[k]
            torch.testing.assert_close(want, delta, rtol=1e-9, atol=1e-9)
    assert torch.linalg.matrix_norm(before_reset) > 1e-3  # the reset had something to forget


def test_exec_masked_steps_leave_item_state_bitwise_unchanged():
    g = make_ttt_layer(dtype=torch.float32, clip_norm=0.3)
    B, N = 3, 48
    gen = torch.Generator().manual_seed(5)
    masks = torch.rand(N, B, generator=gen) < 0.6
    masks[:, 0] = True  # item 0 always runs (crosses chunk boundaries on a fixed schedule)
    x = torch.randn(B, N, D)
    x0 = torch.randn(B, N, D)
    x[~masks.T] = float("nan")  # masked steps get garbage that must not reach the state
    x0[~masks.T] = float("inf")
    with torch.no_grad(), g.streaming(B):
        st = g._streaming_state
        for t in range(N):
            before = {k: v.clone() for k, v in st.tensors().items()}
            g.set_exec_mask(masks[t])
            out = g(x[:, t:t + 1], x0[:, t:t + 1])
            m = masks[t]
            for k, v in st.tensors().items():
                assert torch.equal(v[~m], before[k][~m]), (t, k)
            assert torch.isfinite(out[m]).all()
            assert (st.pos[m] != before["pos"][m]).all()  # executed items did advance
        assert torch.equal(st.updates, masks.long().sum(0) // C)
        assert int(st.skipped.sum()) == 0


def test_reset_gives_fresh_item_state_and_leaves_others_untouched():
    g = make_ttt_layer(dtype=torch.float32, clip_norm=0.3)
    B, N = 3, 3 * C + 3
    x = torch.randn(B, N, D)
    x0 = torch.randn(B, N, D)
    mask = torch.tensor([False, True, False])
    with torch.no_grad(), g.streaming(B):
        stream_calls(g, x, x0, [5, 9, 13])
        st = g._streaming_state
        g.set_exec_mask(~mask)  # the reset item is exec-masked: moshi's reset re-enables it
        before = {k: v.clone() for k, v in st.tensors().items()}
        fresh = g._init_streaming_state(B).tensors()
        for k in ("w", "z_buf", "s_buf", "pos", "last_norm", "updates"):
            assert not torch.equal(before[k][1], fresh[k][1]), k  # the reset is not vacuous
        g.reset_streaming(mask)
        for k, v in st.tensors().items():
            assert torch.equal(v[1], fresh[k][1]), k
            assert torch.equal(v[~mask], before[k][~mask]), k
        assert bool(st.exec_mask.all())
        assert torch.equal(g.fast_weight_delta()[1], torch.zeros_like(g.fast_weight_delta()[1]))
        tel = g.telemetry()
        assert int(tel["updates"][1]) == 0 and float(tel["drift"][1]) == 0 and int(tel["frames_to_update"][1]) == C


# -- clipping and non-finite chunks ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
def test_clip_applies_delta_with_norm_tau(dtype):
    """Chunk 0's ΔW has raw norm > τ: W − W⁽⁰⁾ = η·τ·ΔW/‖ΔW‖, right after the chunk, during chunk 1
    (whose own ΔW is 0: x0 = 0 there), and after it."""
    probe = make_ttt_layer(dtype=dtype)
    x = torch.randn(2, 2 * C, D, dtype=dtype)
    x0 = torch.randn(2, 2 * C, D, dtype=dtype)
    x0[:, C:] = 0
    with torch.no_grad():
        z = probe.activations(x)
        w0 = probe.linear_out.weight
        _, w1 = naive_ttt_mlp(z[:, :C], x0[:, :C], w0, probe.ttt.conv_weight, probe.ttt.w_target, probe.cfg)
        unclipped = w1 - w0  # η·ΔW₀
    tau = float(torch.linalg.matrix_norm(unclipped).min()) / probe.cfg.lr / 3
    g = make_ttt_layer(dtype=dtype, clip_norm=tau)
    lr = g.cfg.lr
    want = unclipped / torch.linalg.matrix_norm(unclipped)[:, None, None] * (lr * tau)
    with torch.no_grad(), g.streaming(2):
        g(x[:, :C], x0[:, :C])
        tel = g.telemetry()
        assert (tel["last_delta_norm"] > tau).all()
        torch.testing.assert_close(tel["last_delta_norm"], torch.linalg.matrix_norm(unclipped) / lr,
                                   rtol=1e-6, atol=0)
        for t in range(C, 2 * C):
            delta = g.fast_weight_delta()
            torch.testing.assert_close(torch.linalg.matrix_norm(delta), torch.full((2,), lr * tau, dtype=dtype),
                                       rtol=1e-6, atol=0)
            torch.testing.assert_close(delta, want, rtol=1e-5, atol=1e-6 * lr * tau)
            g(x[:, t:t + 1], x0[:, t:t + 1])
        tel = g.telemetry()
        torch.testing.assert_close(torch.linalg.matrix_norm(g.fast_weight_delta()),
                                   torch.full((2,), lr * tau, dtype=dtype), rtol=1e-6, atol=0)
    assert tel["updates"].tolist() == [2, 2] and tel["clips"].tolist() == [1, 1]


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("where,target", [("x0", "x0"), ("x", "x0"), ("x", "mlp_input")])
def test_nonfinite_chunk_is_skipped(where, target, value):
    g = make_ttt_layer(dtype=F64, target=target)
    T, p = 4 * C + 3, C + 2  # the bad frame is in chunk 1 of item 0
    x = torch.randn(2, T, D, dtype=F64)
    x0 = torch.randn(2, T, D, dtype=F64)
    (x0 if where == "x0" else x)[0, p, 3] = value

    outs, deltas = [], {}
    with torch.no_grad(), g.streaming(2):
        for t in range(T):
            outs.append(g(x[:, t:t + 1], x0[:, t:t + 1]))
            delta = g.fast_weight_delta()
            assert torch.isfinite(delta).all() and torch.isfinite(g._streaming_state.w).all()
            if (t + 1) % C == 0:
                deltas[(t + 1) // C] = delta
                tel = g.telemetry()
                n = (t + 1) // C
                assert tel["skipped"].tolist() == [int(n >= 2), 0]
                assert tel["updates"].tolist() == [n - int(n >= 2), n]
    stream = torch.cat(outs, dim=1)
    # Chunk 1 of item 0 contributed nothing, chunks 2 and 3 did.
    torch.testing.assert_close(deltas[2][0], deltas[1][0], rtol=1e-12, atol=1e-12)
    assert (deltas[3][0] - deltas[2][0]).abs().max() > 1e-3
    # Non-finite outputs only where the MLP input itself is non-finite.
    bad = ~torch.isfinite(stream).all(-1)
    expect = torch.zeros_like(bad)
    if where == "x":
        expect[0, p] = True
    assert torch.equal(bad, expect)

    with torch.no_grad():
        par = g(x, x0)
        z = g.activations(x)
        src = x if target == "mlp_input" else x0
        ref, ref_w = naive_ttt_mlp(z[:, :4 * C], src[:, :4 * C], g.linear_out.weight, g.ttt.conv_weight,
                                   g.ttt.w_target, g.cfg)
    torch.testing.assert_close(par[~bad], stream[~bad], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(stream[:, :4 * C][~bad[:, :4 * C]], ref[~bad[:, :4 * C]], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(deltas[4], ref_w - g.linear_out.weight, rtol=1e-9, atol=1e-9)

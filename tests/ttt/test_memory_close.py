"""Nothing heard is lost: `memory.close` folds a conversation's incomplete last chunk as a short chunk, so
the saved W equals the naive reference's W after the whole sequence (fp64); the factor log and the stored
forms (`encode` / `decode`) give back the same delta."""

import pytest
import torch

from moshi_ttt.memory.compression import Compression
from moshi_ttt.ttt.config import TTTConfig
from moshi_ttt.ttt.layer_memory import close, decode, encode
from moshi_ttt.ttt.naive import naive_ttt_mlp
from moshi_ttt.ttt.stream import TTTState

pytestmark = pytest.mark.usefixtures("torch_single_thread")

B, D, H, C = 2, 16, 48, 4
CFG = TTTConfig(chunk_size=C, lr=0.1, kernel_size=3, future_frames=1, init="ntp", clip_norm=0.9)


def _layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(D, H, generator=g, dtype=torch.float64)
    wt = torch.eye(D, dtype=torch.float64) + 0.1 * torch.randn(D, D, generator=g, dtype=torch.float64)
    return w0, wt, torch.randn(D, 1, 3, generator=g, dtype=torch.float64)


def _streamed(T, cfg=CFG, seed=1, factors=False):
    """A fp64 state after T frames per item (folding due chunks), and the frames (z [B, T, H], src)."""
    w0, wt, conv = _layer()
    st = TTTState(B, C, w0, torch.float64, wt, conv, cfg.past_frames)
    if factors:
        st.keep_factors()
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    src = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    for t in range(T):
        st.step(z[:, t:t + 1], src[:, t:t + 1])
        st.fold(st.due(), cfg)
    return st, z, src, (w0, wt, conv)


@pytest.mark.parametrize("T", [1, 3, 8, 11, 14], ids=lambda t: f"T{t}")
def test_closed_snapshot_is_the_naive_reference_after_every_frame(T):
    st, z, src, (w0, wt, conv) = _streamed(T)
    _, ref_w = naive_ttt_mlp(z, src, w0, conv, wt, CFG)
    for b in range(B):
        snap = st.snapshot(b)
        closed, last = close(st, snap, CFG)
        assert torch.allclose(closed["w"], ref_w[b], rtol=0, atol=1e-12), (closed["w"] - ref_w[b]).abs().max()
        assert int(closed["pos"]) == 0 and (last is None) == (T % C == 0)
        assert int(closed["updates"]) + int(closed["skipped"]) == -(-T // C)
        if T % C:  # the short chunk moved W: without it the memory would miss those frames
            assert not torch.allclose(snap["w"], ref_w[b], rtol=0, atol=1e-6)
    assert bool((st.delta() != 0).any()) or T < C


def test_short_chunk_conv_is_confined_to_its_frames():
    """The short chunk's conv sees zeros after its last frame (not the stale rows of an earlier chunk)."""
    T = 2 * C + 2
    st, z, src, (w0, wt, conv) = _streamed(T)
    snap = st.snapshot(0)
    stale = dict(snap, s_buf=snap["s_buf"].clone(), z_buf=snap["z_buf"].clone())
    stale["s_buf"][2:] = 1e3  # rows past pos: never part of the short chunk
    stale["z_buf"][2:] = 1e3
    assert torch.equal(close(st, snap, CFG)[0]["w"], close(st, stale, CFG)[0]["w"])
    # Confinement is what the reference does: the frames of the short chunk alone.
    _, ref_w = naive_ttt_mlp(z[:1], src[:1], w0, conv, wt, CFG)
    assert torch.allclose(close(st, snap, CFG)[0]["w"], ref_w[0], rtol=0, atol=1e-12)


def test_close_counts_a_clipped_or_skipped_short_chunk_and_changes_nothing():
    T = C + 3
    st, z, src, _ = _streamed(T, cfg=TTTConfig(**{**CFG.to_dict(), "clip_norm": 1e-3}))
    snap = st.snapshot(0)
    before = {k: v.clone() for k, v in snap.items()}
    state_before = {k: v.clone() for k, v in st.tensors().items()}
    closed, _ = close(st, snap, TTTConfig(**{**CFG.to_dict(), "clip_norm": 1e-3}))
    assert int(closed["clips"]) == int(snap["clips"]) + 1 and float(closed["last_norm"]) > 1e-3
    for k, v in snap.items():
        assert torch.equal(v, before[k]), k
    for k, v in st.tensors().items():
        assert torch.equal(v, state_before[k]), k
    bad = dict(snap, s_buf=snap["s_buf"].clone())
    bad["s_buf"][1, 0] = float("nan")
    closed, _ = close(st, bad, CFG)
    assert int(closed["skipped"]) == int(snap["skipped"]) + 1 and torch.equal(closed["w"], snap["w"])


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
def test_factor_log_sums_to_the_delta(dtype, tol):
    T = 2 * C + 1  # 9 frames · (D + H) = 576 values < D · H = 768: the log is kept
    st, _, _, _ = _streamed(T, factors=True)
    closed, last = close(st, st.snapshot(1), CFG)
    u = torch.cat([f[0] for f in st.factors[1]] + [last[0]]).to(dtype)
    zz = torch.cat([f[1] for f in st.factors[1]] + [last[1]]).to(dtype)
    assert u.shape == (T, D) and zz.shape == (T, H)
    delta = (closed["w"] - st.w0).to(dtype)
    assert torch.allclose(u.T @ zz, delta, rtol=0, atol=tol)
    st.reset(torch.tensor([True, False]))
    assert st.factors[0] == [] and len(st.factors[1]) == 2


def test_factor_log_is_dropped_once_larger_than_the_delta():
    st, _, _, _ = _streamed(5 * C, factors=True)  # 20 frames · 64 ≥ 768
    assert st.factors == [None, None]
    st.reset(torch.tensor([True, True]))
    assert st.factors == [[], []]
    st.restore(0, st.snapshot(1))
    assert st.factors[0] is None  # a restored item's history is unknown


def test_compression_parse():
    assert Compression.parse("exact") == Compression("exact")
    assert Compression.parse("rank:8") == Compression("rank", 8) and str(Compression.parse("RANK:8")) == "rank:8"
    for bad in ("rank:0", "rank:", "rank:x", "fp8", ""):
        with pytest.raises(ValueError, match="invalid memory format"):
            Compression.parse(bad)


def test_stored_forms_decode_to_the_delta():
    g = torch.Generator().manual_seed(3)
    u, zz = torch.randn(5, D, generator=g), torch.randn(5, H, generator=g)
    delta = u.T @ zz  # rank 5
    form, t = encode(delta, (u, zz), Compression("exact"))
    assert form == "factors" and set(t) == {"u", "z"}
    assert torch.allclose(decode(form, t)[0], delta, rtol=0, atol=1e-5)
    form, t = encode(delta, None, Compression("exact"))
    assert form == "dense" and torch.equal(decode(form, t)[0], delta)
    big = (torch.randn(20, D, generator=g), torch.randn(20, H, generator=g))  # 1280 values > 768
    assert encode(big[0].T @ big[1], big, Compression("exact"))[0] == "dense"
    form, t = encode(delta, None, Compression("bf16"))
    assert t["delta"].dtype == torch.bfloat16
    err = (decode(form, t)[0] - delta).abs().max() / delta.abs().max()
    assert 0 < err < 2 ** -7
    errs = []
    for r in (1, 3, 5):
        form, t = encode(delta, None, Compression("rank", r))
        assert t["p"].shape == (D, r) and t["q"].shape == (r, H) and t["p"].dtype == torch.bfloat16
        errs.append(torch.linalg.matrix_norm(decode(form, t)[0] - delta) / torch.linalg.matrix_norm(delta))
        assert torch.equal(encode(delta, None, Compression("rank", r))[1]["p"], t["p"])  # deterministic
    assert errs[0] > errs[1] > errs[2] and errs[2] < 2 ** -6  # full rank: only bf16 rounding left

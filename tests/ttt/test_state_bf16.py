"""The bf16 fast-weight state (`state_dtype: bfloat16`): close to the fp32 state over many chunks, the fast
weight is the applied weight, and its rounding (stochastic by default) keeps small updates that
round-to-nearest loses. Thresholds are measured values with about 2× margin (docs/capacity.md)."""

import pytest
import torch

from moshi_ttt.ttt.config import TTTConfig
from moshi_ttt.ttt.stream import TTTState, rounding_bits, stochastic_round_

from _layers import make_ttt_layer

pytestmark = pytest.mark.usefixtures("torch_single_thread")

BF16 = torch.bfloat16
CHUNKS = 10


def _stream(g, x, x0):
    """Streams the layer frame by frame; returns (outputs, W⁽ⁱ⁾ in fp32, W⁽ⁱ⁾ − W⁽⁰⁾)."""
    with torch.no_grad(), g.streaming(x.shape[0]):
        out = torch.cat([g(x[:, t:t + 1], x0[:, t:t + 1]) for t in range(x.shape[1])], dim=1)
        st = g._streaming_state
        assert int(st.updates.min()) == CHUNKS
        return out.float(), st.w.float().clone(), st.delta()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# Measured over seeds 0-3 (d 16, h 40, C 8, η 0.05: ‖ΔW‖ ≈ ‖W⁽⁰⁾‖ after 10 chunks), worst seed:
# fast weight 6.6e-3 / 4.9e-3 and outputs 5.6e-3 / 4.3e-3 (stochastic / nearest).
@pytest.mark.parametrize("rounding,w_tol,out_tol", [("stochastic", 1.5e-2, 1.2e-2), ("nearest", 1e-2, 1e-2)])
@pytest.mark.parametrize("seed", [0, 3])
def test_bf16_state_streams_close_to_fp32_state(rounding, w_tol, out_tol, seed):
    C = 8
    ref = make_ttt_layer(dtype=BF16, seed=seed)
    g = make_ttt_layer(dtype=BF16, seed=seed, state_dtype="bfloat16", state_rounding=rounding)
    gen = torch.Generator().manual_seed(10 + seed)
    x = torch.randn(2, CHUNKS * C, ref.dim, generator=gen).to(BF16)
    x0 = torch.randn(2, CHUNKS * C, ref.dim, generator=gen).to(BF16)
    out32, w32, d32 = _stream(ref, x, x0)
    out16, w16, _ = _stream(g, x, x0)
    assert float(d32.norm() / ref._base_weight().float().norm()) > 0.5  # the updates are not negligible
    assert _rel(w16, w32) < w_tol
    assert _rel(out16, out32) < out_tol
    # Not vacuous: the outputs after the first chunk differ from the base MLP's by far more than that.
    with torch.no_grad():
        base = ref.linear_out(ref.activations(x)).float()
    assert _rel(base[:, C:], out32[:, C:]) > 10 * out_tol


def test_bf16_state_is_one_bf16_tensor_applied_as_is():
    g = make_ttt_layer(dtype=BF16, state_dtype="bfloat16")
    with g.streaming(2):
        st = g._streaming_state
        assert st.w.dtype == BF16 and st.w_apply is st.w and "w_apply" not in st.tensors()
        assert st.bytes == 2 * g.dim * g.hidden + 4 * (g.cfg.chunk_size + 1) * (g.dim + g.hidden) + 5 * 8 + 4
    ref = make_ttt_layer(dtype=BF16)
    with ref.streaming(2):
        assert ref._streaming_state.bytes == st.bytes + 4 * g.dim * g.hidden  # fp32 master + bf16 copy


def _small_updates(stochastic: bool, rho: float = 1e-4, folds: int = 8, d: int = 64, h: int = 176, C: int = 8):
    """A bf16 state and the fp32 state folding the same chunks, η set so that each fold's update is
    rms(ηΔW) ≈ ρ · rms(W⁽⁰⁾); returns (kept, fp32 delta) with kept = ⟨Δ, Δ_fp32⟩ / ‖Δ_fp32‖²."""
    g = torch.Generator().manual_seed(0)
    w0 = (torch.randn(d, h, generator=g) / h ** 0.5).to(BF16)
    z = torch.randn(folds * C, 1, 1, h, generator=g)
    s = torch.randn(folds * C, 1, 1, d, generator=g)
    dw = torch.einsum("tbd,tbh->dh", s[:C, 0], z[:C, 0])
    lr = rho * float(w0.float().pow(2).mean().sqrt() / dw.pow(2).mean().sqrt())
    cfg = TTTConfig(chunk_size=C, lr=lr, kernel_size=1, future_frames=0, init="ntp", use_conv=False,
                    use_target_proj=False)
    ref = TTTState(1, C, w0, torch.float32)
    st = TTTState(1, C, w0, torch.float32, state_dtype=BF16, stochastic=stochastic, rounding_seed=7)
    for t in range(folds * C):
        for x in (ref, st):
            x.step(z[t].to(BF16), s[t].to(BF16))
            x.fold(x.due(), cfg)
    d_ref = ref.delta()[0]
    return float((st.delta()[0] * d_ref).sum() / d_ref.pow(2).sum()), d_ref


def test_nearest_rounding_loses_small_updates_stochastic_keeps_them():
    """At ρ = 1e-4 per fold (updates under half a bf16 ulp of most entries) round-to-nearest keeps
    about 6 % of the accumulated update, stochastic rounding all of it on average (measured 0.06 and
    1.00 at d 256; docs/capacity.md). This is why stochastic rounding is the default."""
    kept_rtn, d_ref = _small_updates(stochastic=False)
    kept_sr, _ = _small_updates(stochastic=True)
    assert float(d_ref.abs().max()) > 0
    assert kept_rtn < 0.25
    assert 0.8 < kept_sr < 1.2


def _sr(x, seed, step):
    return stochastic_round_(x.clone(), *rounding_bits(seed, step, *x.shape)).to(BF16)


def test_stochastic_rounding_is_unbiased_and_seeded():
    x = torch.full((400, 500), 1.0) + 1e-4  # 1e-4 is 1/78 of the bf16 ulp at 1.0
    assert torch.equal(x.to(BF16), torch.ones_like(x, dtype=BF16))  # round-to-nearest: lost
    y = _sr(x, seed=3, step=5)
    assert abs(float(y.double().mean()) - 1.0001) < 1e-5
    assert set(y.float().unique().tolist()) == {1.0, 1.0078125}  # always one of the two neighbours
    prepared = stochastic_round_(x.clone(), *rounding_bits(3, 5, *x.shape))
    assert torch.equal(prepared, prepared.to(BF16).float())  # the cast after it is exact
    assert torch.equal(y, _sr(x, seed=3, step=5))
    assert not torch.equal(y, _sr(x, seed=3, step=6))
    assert not torch.equal(y, _sr(x, seed=4, step=5))
    # Unbiased for every entry, negative values too: the mean over 400 draws of one matrix's rounding.
    v = torch.tensor([[0.3, -0.3, 1e-3, -7.7]]).repeat(4, 1)
    mean = torch.stack([_sr(v, 0, k).double() for k in range(400)]).mean(0)
    ulp = torch.tensor([2 ** -9, 2 ** -9, 2 ** -17, 2 ** -5], dtype=torch.float64)
    assert ((mean - v.double()).abs() < 0.15 * ulp).all()
    e = torch.tensor([[float("inf"), -float("inf"), float("nan"), -2.0, 0.0]])
    out = _sr(e, 0, 0)
    assert out[0, :2].isinf().all() and out[0, 2].isnan() and out[0, 3] == -2.0 and out[0, 4] == 0.0


def test_state_dtype_config_is_validated():
    with pytest.raises(ValueError, match="state_dtype='float16'"):
        TTTConfig(state_dtype="float16")
    with pytest.raises(ValueError, match="state_rounding='up'"):
        TTTConfig(state_rounding="up")
    with pytest.raises(ValueError, match="rounding_seed=-1"):
        TTTConfig(rounding_seed=-1)
    with pytest.raises(ValueError, match="state dtype torch.float16"):
        TTTState(1, 4, torch.zeros(2, 3), torch.float32, state_dtype=torch.float16)
    with pytest.raises(ValueError, match="folds in float32, not in the accumulation dtype torch.float64"):
        TTTState(1, 4, torch.zeros(2, 3, dtype=torch.float64), torch.float64, state_dtype=BF16)


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_fp32_model_apply_copy_is_the_bf16_state_after_folds(rounding, monkeypatch):
    """An fp32 model with a bf16 state applies an fp32 copy, refreshed block by block inside the fold: it must
    hold exactly the bf16 weight's values after every fold (several blocks per fold, and a ragged last block)."""
    import moshi_ttt.ttt.stream as stream

    monkeypatch.setattr(stream, "FOLD_ROWS", 5)
    g = make_ttt_layer(dtype=torch.float32, state_dtype="bfloat16", state_rounding=rounding)
    assert g.dim % 5 != 0
    x = torch.randn(2, 3 * g.cfg.chunk_size, g.dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), g.streaming(2):
        st = g._streaming_state
        assert st.w.dtype == BF16 and st.w_apply.dtype == torch.float32
        for t in range(x.shape[1]):
            g(x[:, t:t + 1], x[:, t:t + 1])
            assert torch.equal(st.w_apply, st.w.float())
        assert int(st.updates.min()) == 3 and float(st.delta().norm()) > 0

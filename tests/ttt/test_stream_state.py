"""`TTTState.snapshot` / `restore`: an item restored into a fresh state (any slot) continues bitwise as if
it had never been interrupted; a snapshot that does not fit is refused."""

import pytest
import torch

from moshi_ttt.ttt.config import TTTConfig
from moshi_ttt.ttt.stream import TTTState

pytestmark = pytest.mark.usefixtures("torch_single_thread")

B, D, H, C = 3, 8, 12, 4
CFG = TTTConfig(chunk_size=C, lr=0.1, kernel_size=3, future_frames=1, init="ntp", clip_norm=0.5)


def _layer(dtype):
    """W⁽⁰⁾ in the model dtype, W_target and conv taps (what a TTTGating hands its state)."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(D, H, generator=g).to(dtype)
    wt = (torch.eye(D) + 0.1 * torch.randn(D, D, generator=g)).to(dtype)
    return w0, wt, torch.randn(D, 1, 3, generator=g).to(dtype)


def _state(dtype, bf16_state=False):
    """bf16_state: a bf16 fast weight folding with stochastic rounding (the noise of a fold depends on the
    seed and the item's fold count only, so a restored item replays it bitwise in any slot)."""
    w0, wt, conv = _layer(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return TTTState(B, C, w0, acc, wt, conv, CFG.past_frames, state_dtype=torch.bfloat16 if bf16_state else None,
                    stochastic=bf16_state, rounding_seed=5)


def _frame(st, z, src, mask):
    """One driver step as the layer runs it: exec mask, the per-frame step, then the due folds."""
    st.set_exec_mask(mask)
    out = st.step(z, src)
    st.fold(st.due(), CFG)
    return out


@pytest.mark.parametrize("dtype,bf16_state", [(torch.float64, False), (torch.float32, False), (torch.bfloat16, False),
                                              (torch.bfloat16, True), (torch.float32, True)],
                         ids=["fp64", "fp32", "bf16", "bf16-bf16state", "fp32-bf16state"])
def test_restore_of_snapshot_continues_bitwise(dtype, bf16_state):
    N, cut = 25, 13
    g = torch.Generator().manual_seed(1)
    z = torch.randn(N, B, 1, H, generator=g).to(dtype)
    src = torch.randn(N, B, 1, D, generator=g).to(dtype)
    masks = torch.rand(N, B, generator=g) < 0.8
    masks[:, 0] = True
    ref = _state(dtype, bf16_state)
    ref_out = [_frame(ref, z[t], src[t], masks[t]) for t in range(cut)]
    snaps = [ref.snapshot(b) for b in range(B)]
    # Not vacuous: the snapshot holds folded deltas and partial chunks of different lengths.
    assert bool((ref.updates > 0).all()) and len(set(ref.pos.tolist())) > 1 and bool(ref.pos.ne(0).any())
    assert all(bool(ref.delta()[b].ne(0).any()) for b in range(B))

    perm = [2, 0, 1]  # item b continues in slot perm[b] of a fresh state
    inv = [perm.index(s) for s in range(B)]
    new = _state(dtype, bf16_state)
    for b in range(B):
        new.restore(perm[b], snaps[b])
    for k, v in ref.tensors().items():  # w_apply included (bf16)
        assert torch.equal(new.tensors()[k], v[inv]), k
    for t in range(cut, N):
        ref_out.append(_frame(ref, z[t], src[t], masks[t]))
        out = _frame(new, z[t, inv], src[t, inv], masks[t, inv])
        assert torch.equal(out, ref_out[t][inv]), t
    assert bool((ref.updates > torch.stack([s["updates"] for s in snaps])).all())  # every item folded again
    for k, v in ref.tensors().items():
        assert torch.equal(new.tensors()[k], v[inv]), k


def test_snapshot_is_a_copy_and_restore_touches_only_its_item():
    st = _state(torch.float32)
    on = torch.ones(B, dtype=torch.bool)
    for _ in range(C + 2):
        _frame(st, torch.randn(B, 1, H), torch.randn(B, 1, D), on)
    at_snap = {k: v[0].clone() for k, v in st.tensors().items()}
    snap = st.snapshot(0)
    _frame(st, torch.randn(B, 1, H), torch.randn(B, 1, D), on)  # the state moves on, the snapshot does not
    assert st.pos.tolist() == [3, 3, 3] and int(snap["pos"]) == 2
    before = {k: v.clone() for k, v in st.tensors().items()}
    st.restore(1, snap)
    for k, v in st.tensors().items():
        assert torch.equal(v[1], at_snap[k]), k
        assert torch.equal(v[[0, 2]], before[k][[0, 2]]), k


def test_restore_refuses_a_snapshot_that_does_not_fit():
    st = _state(torch.float32)
    snap = st.snapshot(0)
    with pytest.raises(IndexError, match="item 3 out of range for a batch of 3"):
        st.restore(3, snap)
    with pytest.raises(ValueError, match="keys"):
        st.restore(0, {k: v for k, v in snap.items() if k != "lost"})
    with pytest.raises(ValueError, match=r"'w' is \(8, 12\) torch.float64"):
        st.restore(0, dict(snap, w=snap["w"].double()))
    with pytest.raises(ValueError, match=r"'z_buf' is \(5, 12\)"):
        st.restore(0, dict(snap, z_buf=torch.zeros(C + 1, H)))

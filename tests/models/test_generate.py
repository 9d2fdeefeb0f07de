"""`TTTLMGen`: the fold runs outside the per-frame step, on the host's schedule, with exactly the
semantics of the self-folding layer (bitwise), across exec masks, resets and CFG."""

import pytest
import torch
from moshi.models.lm import LMGen
from test_model_streaming import CHUNK, build_pair

import moshi_ttt.modules.gating
from moshi_ttt.models.lm import FoldClock, TTTLMGen

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _drive(driver, m, B, n_steps, cfg_coef=1.0):
    """Random exec masks and two resets; returns (emitted tokens per step, text logits, fast weights,
    per-layer counters, host clock frames or None)."""
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(n_steps, B, generator=g) < 0.7
    logits = []
    kw = dict(cfg_coef=cfg_coef, cfg_is_no_text=True) if cfg_coef != 1 else {}
    gen = driver(m, use_sampling=True, support_out_of_sync=True,
                 on_text_logits_hook=lambda x: logits.append(x.clone()), **kw)
    torch.manual_seed(0)
    toks = []
    with gen.streaming(B):
        for t in range(n_steps):
            if t in (CHUNK + 3, 2 * CHUNK + 5):
                gen.reset_streaming(torch.arange(B) == (t % B))
            gen.set_exec_mask(masks[t])
            toks.append(gen.step(torch.randint(0, m.card, (B, 8, 1), generator=g)))
        fw = {i: g_.fast_weight_delta().clone() for i, g_ in m.ttt_gatings().items()}
        state = {i: {k: getattr(g_._streaming_state, k).clone() for k in ("updates", "pos", "lost")}
                 for i, g_ in m.ttt_gatings().items()}
        clock = gen._streaming_state.fold_clock.frames.copy() if driver is TTTLMGen else None
    return torch.stack(toks), torch.cat(logits, 2), fw, state, clock


@pytest.mark.parametrize("cfg_coef", [1.0, 2.0], ids=["nocfg", "cfg"])
def test_host_folds_equal_self_folds_bitwise(cfg_coef):
    m, _ = build_pair("ntp", lr=0.05)
    B, n = 3, 4 * CHUNK + 7
    tok_a, log_a, fw_a, st_a, _ = _drive(LMGen, m, B, n, cfg_coef)
    tok_b, log_b, fw_b, st_b, clock = _drive(TTTLMGen, m, B, n, cfg_coef)
    assert torch.equal(tok_a, tok_b) and torch.equal(log_a, log_b)
    for i in fw_a:
        assert torch.equal(fw_a[i], fw_b[i]), i
        assert fw_a[i].abs().max() > 1e-3  # the fast weights moved: the comparison is not vacuous
        for k in st_a[i]:
            assert torch.equal(st_a[i][k], st_b[i][k]), (i, k)
        assert int(st_b[i]["lost"].sum()) == 0
        assert int(st_b[i]["updates"].sum()) > 0
        # The host clock mirrors the device phase without ever reading it.
        assert st_b[i]["pos"][:B].tolist() == clock.tolist()


def test_without_a_fold_frames_are_lost_and_counted():
    """A driver that declares host folds but never folds: frames past a complete chunk are not recorded
    (counted in `lost`) rather than overwriting it — the failure is visible, not silent."""
    m, _ = build_pair("ntp", lr=0.05)
    gen = LMGen(m, use_sampling=True)
    with gen.streaming(1):
        m.ttt_set_host_folds(True)
        for _ in range(CHUNK + 3):
            gen.step(torch.randint(0, m.card, (1, 8, 1)))
        for g in m.ttt_gatings().values():
            st = g._streaming_state
            assert st.lost.tolist() == [3] and st.pos.tolist() == [CHUNK] and st.updates.tolist() == [0]


def test_self_fold_refuses_cuda_graph_capture(monkeypatch):
    """Under a CUDA-graph capture the layer cannot fold by itself (the fold would be frozen into the
    graph): it raises and names TTTLMGen. With a folding driver the captured step has no host logic."""
    m, _ = build_pair("ntp", lr=0.05)
    monkeypatch.setattr(moshi_ttt.modules.gating, "_capturing", lambda: True)
    x = torch.randn(1, 1, m.dim)
    g = m.ttt_gatings()[m.ttt_layer_indices[0]]
    with torch.no_grad(), g.streaming(1):
        with pytest.raises(RuntimeError, match="TTTLMGen"):
            g(x, x)
        g._streaming_state.host_folds = True
        assert torch.isfinite(g(x, x)).all()


def test_fold_clock_masks_and_resets():
    c = FoldClock(3, chunk=2)
    assert c.step() == []
    c.set_exec_mask(torch.tensor([True, False, True]))
    assert c.step() == [0, 2]
    c.reset(torch.tensor([False, True, False]))  # re-enables item 1, as moshi's State.reset does
    assert c.frames.tolist() == [0, 0, 0] and c.exec.tolist() == [True, True, True]
    with pytest.raises(ValueError, match="batch of 3"):
        c.set_exec_mask(torch.tensor([True, False]))


def test_tttlmgen_refuses_a_plain_model():
    _, base = build_pair("ntp", lr=0.05)
    with pytest.raises(TypeError, match="TTTLMModel"):
        TTTLMGen(base)

"""TTT-Moshi against moshi itself: drop-in equality, parallel == streaming, batched / reset streaming
and moshi's unchanged `LMGen`.

All models are the shipped `tiny` config (n_q 16, 17 delays, like Moshi 7B) with chunk_size 8 so a
30-40 frame sequence spans at least 3 chunks (several fast-weight updates).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from moshi.models.lm import LMGen, LMModel
from moshi.models.lm_utils import _delay_sequence

from moshi_ttt.models.lm import TTTLMGen, TTTLMModel, build_ttt_lm
from moshi_ttt.modules.transformer import TTT_KEY
from moshi_ttt.ttt.config import load_lm_and_ttt

# Thousands of tiny ops: one intra-op thread is several times faster on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("torch_single_thread")

CHUNK = 8
T_SEQ = 30  # ≥ 3 full chunks of CHUNK frames (+ a partial one)


# -- helpers ---------------------------------------------------------------------------------------

def tiny(init: str = "zero", lr: float = 0.5, **lm_overrides):
    """(lm_kwargs, ttt) of the tiny config with the given TTT init / η and chunk_size CHUNK."""
    lm_kwargs, ttt = load_lm_and_ttt("tiny")
    ttt = dataclasses.replace(ttt, layer=dataclasses.replace(ttt.layer, init=init, lr=lr, chunk_size=CHUNK))
    return dict(lm_kwargs, **lm_overrides), ttt


def build_pair(init: str = "zero", lr: float = 0.5, dtype=torch.float32, seed: int = 0, **lm_overrides):
    """A TTT model and a plain moshi LMModel holding the same base weights (both eval mode)."""
    lm_kwargs, ttt = tiny(init, lr, **lm_overrides)
    torch.manual_seed(seed)
    m = build_ttt_lm(lm_kwargs, ttt, device="cpu", dtype=dtype)
    base = LMModel(**lm_kwargs, device="cpu", dtype=dtype).eval()
    base.load_state_dict({k: v for k, v in m.state_dict().items() if TTT_KEY not in k}, strict=True)
    return m, base


def random_codes(m: LMModel, B: int, T: int, seed: int) -> torch.Tensor:
    """Random (undelayed) codes [B, 17, T]: text in [0, text_card), audio in [0, card)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, m.card, (B, m.num_codebooks, T), generator=g)
    codes[:, 0] = torch.randint(0, m.text_card, (B, T), generator=g)
    return codes


def delayed_input(m: LMModel, codes: torch.Tensor) -> torch.Tensor:
    """Exactly the sequence `LMModel.forward` hands to `forward_text`: [B, 17, T]."""
    B = codes.shape[0]
    initial = m._get_initial_token().expand(B, -1, -1)
    delayed = _delay_sequence(m.delays, codes, initial)
    return torch.cat([initial, delayed], dim=2)[:, :, :-1]


def assert_bitwise(a: torch.Tensor, b: torch.Tensor) -> None:
    """torch.equal, treating NaN (moshi's undelayed invalid positions) as equal to NaN."""
    assert a.shape == b.shape
    assert torch.equal(a.isnan(), b.isnan())
    assert torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)), (a - b).abs().nan_to_num(0.0).max()


def stream_text_logits(m: LMModel, seq: torch.Tensor, steps: list[int] | None = None) -> torch.Tensor:
    """Teacher-forced streaming `forward_text`, `steps` frames per call (default 1): [B, 1, T, card]."""
    B, _, T = seq.shape
    steps = steps or [1] * T
    assert sum(steps) == T
    outs, t = [], 0
    with m.streaming(B):
        for s in steps:
            outs.append(m.forward_text(seq[:, :, t:t + s])[1])
            t += s
    return torch.cat(outs, dim=2)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# -- 1. drop-in: zero init is bitwise moshi --------------------------------------------------------

@pytest.mark.parametrize("mode", ["train", "eval"])
def test_zero_init_forward_is_bitwise_moshi(mode):
    m, base = build_pair("zero", lr=0.5)
    m.train(mode == "train")
    base.train(mode == "train")
    codes = random_codes(m, 2, T_SEQ, seed=1)
    with torch.set_grad_enabled(mode == "train"):
        out_t = m(codes)
        out_b = base(codes)
    assert_bitwise(out_t.logits, out_b.logits)
    assert_bitwise(out_t.text_logits, out_b.text_logits)
    assert torch.equal(out_t.mask, out_b.mask) and torch.equal(out_t.text_mask, out_b.text_mask)
    assert out_t.mask.any() and out_t.text_mask.any()


DRIVERS = pytest.mark.parametrize("driver", [LMGen, TTTLMGen], ids=["LMGen", "TTTLMGen"])


def _run_lmgen(model: LMModel, user: torch.Tensor, seed: int, driver=LMGen):
    """`driver` (moshi's LMGen or TTTLMGen) with sampling; returns (emitted tokens [B, 9, n], text logits
    [B, 1, T, card], TTT telemetry or None)."""
    B, _, T = user.shape
    text_logits: list[torch.Tensor] = []
    gen = driver(model, use_sampling=True, temp=0.8, temp_text=0.7, top_k=250, top_k_text=25,
                on_text_logits_hook=lambda x: text_logits.append(x.clone()))
    out = []
    torch.manual_seed(seed)
    with gen.streaming(B):
        for t in range(T):
            tokens = gen.step(user[:, :, t:t + 1])
            if tokens is not None:
                out.append(tokens)
        tel = model.ttt_telemetry() if isinstance(model, TTTLMModel) else None
    return torch.cat(out, dim=2), torch.cat(text_logits, dim=2), tel


@pytest.mark.parametrize("B", [1, 2])
@DRIVERS
def test_zero_init_lmgen_generates_identical_tokens(driver, B):
    """Zero init: the same sampled tokens as moshi. Text logits bitwise at B = 1 (the fast weight goes
    through moshi's own `F.linear` kernel); at B > 1 each conversation's fast weight is applied by a
    batched matmul whose summation order differs from moshi's single GEMM: ≤ 1e-6 relative."""
    m, base = build_pair("zero", lr=0.5)
    steps = 3 * CHUNK + 5
    user = torch.randint(0, m.card, (B, 8, steps), generator=torch.Generator().manual_seed(2))
    tok_t, logits_t, tel = _run_lmgen(m, user, seed=1234, driver=driver)
    tok_b, logits_b, _ = _run_lmgen(base, user, seed=1234)
    assert tok_t.shape == (B, 1 + m.dep_q, steps - max(m.delays))
    assert torch.equal(tok_t, tok_b)
    if B == 1:
        assert torch.equal(logits_t, logits_b)
    else:
        assert float((logits_t - logits_b).abs().max()) <= 1e-6 * float(logits_b.abs().max())
    # The TTT path really ran: every item completed its chunks (zero target ⇒ zero delta).
    for layer_tel in tel.values():
        assert layer_tel["updates"].tolist() == [steps // CHUNK] * B
        assert layer_tel["drift"].abs().max().item() == 0.0
    # Sanity that the tokens depend on the seed (the comparison above is not vacuous).
    tok_other, _, _ = _run_lmgen(base, user, seed=4321)
    assert not torch.equal(tok_other, tok_b)


# -- 2. parallel (whole sequence) == streaming, ntp init ------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-9)])
@pytest.mark.parametrize("pattern", ["frame_by_frame", "ragged"])
def test_parallel_equals_streaming_ntp(dtype, tol, pattern):
    m, base = build_pair("ntp", lr=0.05, dtype=dtype)
    B = 2
    codes = random_codes(m, B, T_SEQ, seed=3)
    seq = delayed_input(m, codes)
    with torch.no_grad():
        full = m.forward_text(seq)[1]
        full_base = base.forward_text(seq)[1]
        # LMModel.forward's text logits are forward_text on this sequence, undelayed (text delay 0).
        assert torch.equal(m(codes).text_logits, full)
        steps = None if pattern == "frame_by_frame" else [1, 3, 5, 2, 7, 1, 4, 6, 1]
        streamed = stream_text_logits(m, seq, steps)
        with m.streaming(B):
            m.forward_text(seq)  # one multi-frame streaming call, to read the fast weights after T frames
            drift = torch.stack([t["drift"] for t in m.ttt_telemetry().values()])
            updates = torch.stack([t["updates"] for t in m.ttt_telemetry().values()])
    assert (updates == T_SEQ // CHUNK).all()
    assert (drift > 1e-3).all(), drift
    # TTT matters: after the first chunk the logits are clearly not the base model's.
    assert max_abs(full[:, :, CHUNK:], full_base[:, :, CHUNK:]) > 1e-2
    # ... but the first chunk is exactly the base model (apply-then-update: no delta yet).
    assert max_abs(full[:, :, :CHUNK], full_base[:, :, :CHUNK]) <= tol
    err = max_abs(streamed, full)
    assert err <= tol, f"streaming vs whole-sequence text logits differ by {err:.3e} ({dtype})"


def test_gradient_checkpointing_matches():
    lm_kwargs, ttt = tiny("ntp", lr=0.05)
    torch.manual_seed(0)
    m = TTTLMModel(ttt=ttt, **lm_kwargs).train()
    mc = TTTLMModel(ttt=ttt, gradient_checkpointing=True, **lm_kwargs).train()
    mc.load_state_dict(m.state_dict(), strict=True)
    assert mc.transformer.checkpointing and not m.transformer.checkpointing
    codes = random_codes(m, 2, T_SEQ, seed=4)
    g = torch.Generator().manual_seed(5)

    outs, grads = [], []
    w_text = w_audio = None
    for model in (m, mc):
        out = model(codes)
        if w_text is None:
            w_text = torch.randn(out.text_logits.shape, generator=g)
            w_audio = torch.randn(out.logits.shape, generator=g)
        loss = (out.text_logits.nan_to_num(0.0) * w_text).sum() + (out.logits.nan_to_num(0.0) * w_audio).sum()
        loss.backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if TTT_KEY in n})
    assert_bitwise(outs[0].text_logits, outs[1].text_logits)
    assert_bitwise(outs[0].logits, outs[1].logits)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * len(m.ttt_layer_indices)
    for n in grads[0]:
        assert grads[0][n].abs().max() > 0, f"{n} got no gradient"
        assert torch.equal(grads[1][n], grads[0][n]), (n, max_abs(grads[1][n], grads[0][n]))


def test_ttt_target_source_is_the_token_embedding_sum():
    """X0 handed to every TTT layer is exactly forward_text's transformer input (the summed audio +
    text embeddings), not the residual stream, both whole-sequence and streaming."""
    m, _ = build_pair("ntp", lr=0.05)
    seq = delayed_input(m, random_codes(m, 2, 2 * CHUNK, seed=8))
    with torch.no_grad():
        x0 = None
        for k in range(m.num_audio_codebooks):
            e = m.emb[k](seq[:, k + m.audio_offset])
            x0 = e if x0 is None else x0 + e
        x0 = x0 + m.text_emb(seq[:, 0])
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in m.ttt_layer_indices}
    hooks = [g.register_forward_pre_hook(lambda mod, args, i=i: seen[i].append(args[1].detach().clone()))
             for i, g in m.ttt_gatings().items()]
    try:
        with torch.no_grad():
            m.forward_text(seq)
            stream_text_logits(m, seq)
    finally:
        for h in hooks:
            h.remove()
    for i, xs in seen.items():
        assert len(xs) == 1 + seq.shape[2], i
        assert torch.equal(xs[0], x0), f"layer {i}: whole-sequence x0 is not the embedding sum"
        assert torch.equal(torch.cat(xs[1:], dim=1), x0), f"layer {i}: streaming x0 is not the embedding sum"


# -- 3. batched streaming with exec_mask / per-conversation reset ---------------------------------

def _fast_weights(m: TTTLMModel) -> dict[int, torch.Tensor]:
    return {i: g.fast_weight_delta().clone() for i, g in m.ttt_gatings().items()}


def _alone(m: TTTLMModel, seq: torch.Tensor):
    """Conversation run alone in batch 1: (text logits [1, 1, T, card], fast weights)."""
    with torch.no_grad(), m.streaming(1):
        logits = torch.cat([m.forward_text(seq[:, :, t:t + 1])[1] for t in range(seq.shape[2])], dim=2)
        return logits, _fast_weights(m)


def _run_batched(m: TTTLMModel, active: torch.Tensor, seqs: list, reset_at: int | None = None,
                 after_reset: torch.Tensor | None = None) -> dict:
    """Streams len(seqs) conversations in one batch for active.shape[1] steps: conversation k gets its next
    frame on the steps where active[k] is set, garbage (to be ignored) with its exec mask off on the others.
    With reset_at, item 0 is reset before that step and goes on with `after_reset`. Returns the logits
    [1, 1, steps_k, card] of each conversation, the fast weights at the reset and at the end, the state tensors
    just before and just after the reset, and the telemetry at the end."""
    B, n_steps = active.shape
    seqs = list(seqs)
    garbage = delayed_input(m, random_codes(m, B, n_steps, seed=14))
    out: dict = {}
    logits: list[list[torch.Tensor]] = [[] for _ in range(B)]
    pos = [0] * B
    with torch.no_grad(), m.streaming(B):
        for t in range(n_steps):
            if t == reset_at:
                out["fw_at_reset"] = _fast_weights(m)
                out["states_before_reset"] = _state_snapshot(m)
                m.reset_streaming(torch.tensor([k == 0 for k in range(B)]))
                out["states_after_reset"] = _state_snapshot(m)
                seqs[0], pos[0] = after_reset, 0
            mask = active[:, t]
            m.set_exec_mask(mask)
            frame = garbage[:, :, t:t + 1].clone()
            for k in range(B):
                if mask[k]:
                    frame[k] = seqs[k][0, :, pos[k]:pos[k] + 1]
            step_logits = m.forward_text(frame)[1]
            for k in range(B):
                if mask[k]:
                    logits[k].append(step_logits[k:k + 1])
                    pos[k] += 1
        out["fw_end"] = _fast_weights(m)
        out["telemetry"] = m.ttt_telemetry()
    out["logits"] = [torch.cat(x, dim=2) for x in logits]
    return out


def _assert_alone_runs(m: TTTLMModel, expect: dict) -> None:
    """expect: name → (batched logits, the conversation's sequence, batched fast weights, its item): each
    conversation's logits and fast weights equal its run alone, and those fast weights moved."""
    for name, (got, seq, fw, k) in expect.items():
        ref_logits, ref_fw = _alone(m, seq)
        assert got.shape == ref_logits.shape, name
        err = max_abs(got, ref_logits)
        assert err <= 1e-5, f"conversation {name}: logits differ from its alone run by {err:.3e}"
        for i in ref_fw:
            assert ref_fw[i].abs().max() > 1e-3, "fast weights should have moved"
            err = max_abs(fw[i][k], ref_fw[i][0])
            assert err <= 1e-5, f"conversation {name}, layer {i}: fast weights differ by {err:.3e}"


def test_batched_streaming_exec_mask_matches_alone_runs():
    m, _ = build_pair("ntp", lr=0.05)
    n_steps = 40
    # Schedule of executed steps per conversation (idle steps feed garbage that must be ignored):
    #   0: runs on every step.
    #   1: idle for its first 5 steps.
    #   2: idle for its first 11 steps and again on steps 23..26 (a gap mid-conversation).
    active = torch.ones(3, n_steps, dtype=torch.bool)
    active[1, :5] = False
    active[2, :11] = False
    active[2, 23:27] = False
    lengths = active.sum(1).tolist()
    seqs = [delayed_input(m, random_codes(m, 1, lengths[k], seed=10 + k)) for k in range(3)]
    run = _run_batched(m, active, seqs)

    # Every conversation completed ≥ 2 chunks, so fast weights are non-trivial.
    assert all(lay["updates"].min() >= 2 for lay in run["telemetry"].values())
    lg, fw_end = run["logits"], run["fw_end"]
    _assert_alone_runs(m, {"0": (lg[0], seqs[0], fw_end, 0), "1": (lg[1], seqs[1], fw_end, 1),
                           "2": (lg[2], seqs[2], fw_end, 2)})


def test_batched_streaming_reset_matches_alone_runs():
    m, _ = build_pair("ntp", lr=0.05)
    n_steps = 40
    # 0: reset after step 19, then a new conversation on steps 20..39; 1 and 2 run on every step.
    reset_at = 20
    active = torch.ones(3, n_steps, dtype=torch.bool)
    seqs = [delayed_input(m, random_codes(m, 1, n_steps, seed=10 + k)) for k in range(3)]
    seq0_first, seq0_second = seqs[0][:, :, :reset_at], delayed_input(
        m, random_codes(m, 1, n_steps - reset_at, seed=13))
    run = _run_batched(m, active, seqs, reset_at=reset_at, after_reset=seq0_second)

    before, after, fresh = run["states_before_reset"], run["states_after_reset"], _fresh_item(m)
    for (i, k), v in after.items():
        assert torch.equal(v[1:], before[i, k][1:]), f"reset touched item 1/2 of {i}.{k}"
        assert torch.equal(v[0], fresh[i, k]), f"reset left {i}.{k} of item 0 not fresh"
    # Every conversation completed ≥ 2 chunks in its current run, so fast weights are non-trivial.
    assert all(lay["updates"].min() >= 2 for lay in run["telemetry"].values())
    lg, fw_end = run["logits"], run["fw_end"]
    _assert_alone_runs(m, {
        "0 before reset": (lg[0][:, :, :reset_at], seq0_first, run["fw_at_reset"], 0),
        "0 after reset": (lg[0][:, :, reset_at:], seq0_second, fw_end, 0),
        "1": (lg[1], seqs[1], fw_end, 1),
        "2": (lg[2], seqs[2], fw_end, 2),
    })


# -- 4. moshi's unchanged LMGen --------------------------------------------------------------------

def _drift_updates(m: TTTLMModel) -> tuple[torch.Tensor, torch.Tensor]:
    tel = m.ttt_telemetry()
    return (torch.stack([t["drift"] for t in tel.values()]), torch.stack([t["updates"] for t in tel.values()]))


def _state_snapshot(m: TTTLMModel) -> dict[tuple[int, str], torch.Tensor]:
    return {(i, k): v.clone() for i, g in m.ttt_gatings().items() for k, v in g._streaming_state.tensors().items()}


def _fresh_item(m: TTTLMModel) -> dict[tuple[int, str], torch.Tensor]:
    """The state of one conversation that has just started (W⁽⁰⁾, empty chunk, zero counters)."""
    return {(i, k): v[0] for i, g in m.ttt_gatings().items() for k, v in g._init_streaming_state(1).tensors().items()}


@DRIVERS
def test_lmgen_reset_streaming_clears_fast_weights(driver):
    m, _ = build_pair("ntp", lr=0.05)
    B = 3
    gen = driver(m, use_sampling=True, temp=0.8, temp_text=0.7)
    g = torch.Generator().manual_seed(6)
    torch.manual_seed(0)
    with gen.streaming(B):
        def run(n):
            for _ in range(n):
                gen.step(torch.randint(0, m.card, (B, 8, 1), generator=g))

        run(2 * CHUNK + 3)
        drift, updates = _drift_updates(m)
        assert (updates == 2).all() and (drift > 1e-3).all()

        gen.reset_streaming()  # everything
        drift, updates = _drift_updates(m)
        assert (drift == 0).all() and (updates == 0).all()
        fresh = _fresh_item(m)
        assert all(torch.equal(v[b], fresh[key]) for key, v in _state_snapshot(m).items() for b in range(B))

        run(2 * CHUNK + 3)
        before = _state_snapshot(m)
        drift_before, _ = _drift_updates(m)
        assert (drift_before > 1e-3).all()
        mask = torch.tensor([False, True, False])
        gen.reset_streaming(mask)
        drift, updates = _drift_updates(m)
        assert (drift[:, 1] == 0).all() and (updates[:, 1] == 0).all()
        assert torch.equal(drift[:, [0, 2]], drift_before[:, [0, 2]])
        for key, v in _state_snapshot(m).items():
            assert torch.equal(v[[0, 2]], before[key][[0, 2]]), key
            assert torch.equal(v[1], fresh[key]), key
        # The reset conversation starts again from step 0 (LMGen's own offsets were reset too).
        assert gen._streaming_state.offsets.tolist() == [2 * CHUNK + 3, 0, 2 * CHUNK + 3]
        run(CHUNK)
        _, updates = _drift_updates(m)
        assert (updates[:, 1] == 1).all() and (updates[:, [0, 2]] == 3).all()


@DRIVERS
def test_lmgen_cfg_doubled_batch_keeps_streams_separate(driver):
    """cfg_coef != 1 with cfg_is_no_text needs no fuser: LMGen streams the model with batch 2B, items
    b (conditioned) and b + B (text replaced by the zero token). Their fast weights must be separate
    (each equals its own rows run alone) and LMGen's reset mask must map to both b and b + B."""
    m, _ = build_pair("ntp", lr=0.05)
    B, n_steps = 2, 2 * CHUNK + 3
    gen = driver(m, use_sampling=True, cfg_coef=2.0, cfg_is_no_text=True)
    fed: list[torch.Tensor] = []
    original = m.forward_text

    def recording_forward_text(seq, *args, **kwargs):
        fed.append(seq.clone())
        return original(seq, *args, **kwargs)

    m.forward_text = recording_forward_text  # instance attribute only; LMGen binds it at streaming start
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(0)
    try:
        with gen.streaming(B):
            assert m.ttt_gatings()[0]._streaming_state.batch_size == 2 * B
            for _ in range(n_steps):
                gen.step(torch.randint(0, m.card, (B, 8, 1), generator=g))
            fw = _fast_weights(m)
            before = _state_snapshot(m)
            gen.reset_streaming(torch.tensor([True, False]))
            after = _state_snapshot(m)
    finally:
        del m.forward_text
    assert len(fed) == n_steps and fed[0].shape[0] == 2 * B
    seq = torch.cat(fed, dim=2)  # [2B, 17, n_steps], exactly what the model saw
    assert not torch.equal(seq[:B, 0], seq[B:, 0])  # the unconditioned half has no text
    for b in range(2 * B):
        _, ref = _alone(m, seq[b:b + 1])
        for i in fw:
            assert max_abs(fw[i][b], ref[i][0]) <= 1e-5, f"item {b}, layer {i}"
    for b in range(B):
        for i in fw:
            assert max_abs(fw[i][b], fw[i][b + B]) > 1e-3, "conditioned/unconditioned fast weights coincide"
    # Reset mask [True, False] ⇒ model items 0 and 0 + B reset; 1 and 1 + B untouched.
    fresh = _fresh_item(m)
    for key, v in after.items():
        assert torch.equal(v[0], fresh[key]) and torch.equal(v[B], fresh[key]), key
        assert torch.equal(v[[1, 1 + B]], before[key][[1, 1 + B]]), key

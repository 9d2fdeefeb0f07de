"""Conversation memory of a TTT-Moshi (`moshi_ttt.models.lm_memory`, `memory_format`): fingerprint refusal, the
file and its header, exact dense == exact factors, factors in every format where smaller, nothing for a
conversation that heard nothing, chaining counters, damaged and foreign files."""

from __future__ import annotations

import dataclasses
import json
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from moshi_ttt.models import lm_memory as mem
from moshi_ttt.models import memory_format as mf
from moshi_ttt.models.lm import TTTLMGen, build_ttt_lm
from moshi_ttt.ttt.config import load_lm_and_ttt

pytestmark = pytest.mark.usefixtures("torch_single_thread")

CHUNK = 8


def _model(lr=0.05, seed=0):
    lm_kwargs, ttt = load_lm_and_ttt("tiny")
    ttt = dataclasses.replace(ttt, layer=dataclasses.replace(ttt.layer, init="ntp", lr=lr, chunk_size=CHUNK))
    torch.manual_seed(seed)
    return build_ttt_lm(lm_kwargs, ttt)


def _run(gen, m, B, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        gen.step(torch.randint(0, m.card, (B, 8, 1), generator=g))


def _w(m, item):
    return {i: g.ttt_state().w[item].clone() for i, g in m.ttt_gatings().items()}


@pytest.fixture(scope="module")
def model():
    return _model()


def test_fingerprint_covers_w0_slow_weights_and_config_and_refuses(model):
    fp = mem.fingerprint(model)
    assert fp == mem.fingerprint(_model()) and len(fp) == 64
    assert mem.fingerprint(_model(lr=0.04)) != fp  # another TTT config
    other = _model()
    with torch.no_grad():
        other.ttt_gatings()[2].ttt.conv.weight[0, 0, 0] += 1e-3  # a TTT slow weight
    assert mem.fingerprint(other) != fp
    other = _model()
    with torch.no_grad():
        other.ttt_gatings()[0].linear_out.weight[0, 0] += 1e-3  # W⁽⁰⁾
    assert mem.fingerprint(other) != fp
    gen = TTTLMGen(model, use_sampling=False)
    with gen.streaming(1):
        _run(gen, model, 1, CHUNK + 3, 0)
        memory = mem.capture(model, 0, fp)
        data = mf.dumps(memory)
        with pytest.raises(mem.MemoryRefused, match="another model or TTT config"):
            mem.prepare(model, mf.loads(data), mem.fingerprint(other))
        mem.prepare(model, mf.loads(data), fp)  # the same model accepts it


def test_file_roundtrip_header_and_resume_into_another_slot(model, tmp_path):
    fp = mem.fingerprint(model)
    gen = TTTLMGen(model, use_sampling=False)
    T = 2 * CHUNK + 3
    with gen.streaming(2):
        _run(gen, model, 2, T, 1)
        taken = mem.take(model, 1)
        before = _w(model, 1)
        memory = mem.build(model, taken, fp, now=1000.0)
        assert _w(model, 1).keys() == before.keys() and all(torch.equal(_w(model, 1)[i], before[i]) for i in before)
        assert (memory.frames, memory.chunks, memory.created, memory.last_used) == (T, 3, 1000.0, 1000.0)
        for lm in memory.layers.values():
            assert lm.counters["updates"] == 3 and lm.counters["skipped"] == 0
            assert float(lm.delta.norm()) > 1e-4
        path = mf.save(tmp_path / "m.safetensors", memory)
        meta = mf.header(path.read_bytes())
        assert meta["moshi_ttt_memory"] == mf.FORMAT_VERSION and meta["fingerprint"] == fp
        assert (meta["frames"], meta["chunks"], meta["compression"]) == (str(T), "3", "exact")
        assert float(meta["created"]) == 1000.0 and float(meta["last_used"]) == 1000.0
        loaded = mf.load(path)
        gen.reset_streaming(torch.tensor([True, False]))
        mem.resume(model, 0, loaded, fp)
        tel = model.ttt_telemetry()
        for i, lm in memory.layers.items():
            st = model.ttt_gatings()[i].ttt_state()
            assert torch.allclose(st.w[0], st.w0 + lm.delta, rtol=0, atol=1e-7)
            assert int(st.pos[0]) == 0 and int(st.updates[0]) == 3
            assert torch.allclose(tel[i]["drift"][0], torch.linalg.matrix_norm(lm.delta), rtol=1e-5)
        _run(gen, model, 2, CHUNK, 2)  # the resumed slot folds its next chunk on time
        assert all(int(g.ttt_state().updates[0]) == 4 for g in model.ttt_gatings().values())


def test_exact_factors_and_dense_restore_the_same_fast_weights(model):
    fp = mem.fingerprint(model)
    gen = TTTLMGen(model, use_sampling=False)
    T = 2 * CHUNK + 3  # 19 frames · (64 + 176) < 64 · 176: factors are smaller
    with gen.streaming(1):
        mem.keep_factors(model)
        _run(gen, model, 1, T, 3)
        memory = mem.capture(model, 0, fp)
        assert all(lm.factors is not None and lm.factors[0].shape == (T, 64) for lm in memory.layers.values())
        f_data = mf.dumps(memory)
        dense = dataclasses.replace(memory, layers={i: dataclasses.replace(lm, factors=None)
                                                    for i, lm in memory.layers.items()})
        d_data = mf.dumps(dense)
        assert set(json.loads(mf.header(f_data)["forms"]).values()) == {"factors"}
        assert set(json.loads(mf.header(d_data)["forms"]).values()) == {"dense"}
        assert len(f_data) < len(d_data)
        ws = []
        for data in (f_data, d_data):
            gen.reset_streaming()
            mem.resume(model, 0, mf.loads(data), fp)
            ws.append(_w(model, 0))
        for i in ws[0]:
            scale = float(ws[1][i].abs().max())
            assert torch.allclose(ws[0][i], ws[1][i], rtol=0, atol=1e-6 * scale), i
            assert not torch.equal(ws[1][i], model.ttt_gatings()[i].ttt_state().w0)
        assert all(g.ttt_state().factors == [None] for g in model.ttt_gatings().values())  # dense: unknown
        # a resumed factor memory keeps logging: its next memory is still factors, covering both conversations
        gen.reset_streaming()
        mem.resume(model, 0, mf.loads(f_data), fp)
        _run(gen, model, 1, 5, 4)
        again = mem.capture(model, 0, fp, base=mf.loads(f_data))
        assert all(lm.factors[0].shape == (T + 5, 64) for lm in again.layers.values())


def test_a_new_conversation_that_heard_nothing_has_no_memory(model):
    fp = mem.fingerprint(model)
    gen = TTTLMGen(model, use_sampling=False)
    with gen.streaming(1):
        mem.keep_factors(model)
        assert mem.capture(model, 0, fp) is None  # nothing to store (not a dense all-zero delta)
        _run(gen, model, 1, 3, 9)
        first = mem.capture(model, 0, fp)
        assert first is not None and first.frames == 3
        gen.reset_streaming()
        mem.resume(model, 0, first, fp)
        again = mem.capture(model, 0, fp, base=first)  # resumed, nothing new heard: still its memory
        assert again is not None and again.frames == 3


@pytest.mark.parametrize("fmt, form", [("exact", "factors"), ("bf16", "factors"), ("rank:16", "factors"),
                                       ("rank:4", "rank")])
def test_factors_are_stored_in_every_format_where_smaller(model, fmt, form):
    fp = mem.fingerprint(model)
    gen = TTTLMGen(model, use_sampling=False)
    T = 5  # factors: 4 B · 5 · (64 + 176) = 4800 B a layer; bf16 dense 22528, rank:16 7680, rank:4 1920
    with gen.streaming(1):
        mem.keep_factors(model)
        _run(gen, model, 1, T, 10)
        memory = mem.capture(model, 0, fp)
    data = mf.dumps(memory, fmt)
    assert set(json.loads(mf.header(data)["forms"]).values()) == {form}
    n = len(memory.layers)
    if form == "factors":  # exact, and smaller than the format's own form
        assert len(data) < mf.nbytes("factors", 64, 176, n, frames=T) + 4096 < mf.nbytes("bf16", 64, 176, n)
        back = mf.loads(data)
        for i, lm in memory.layers.items():
            assert torch.allclose(back.layers[i].delta, lm.delta, rtol=0, atol=1e-6 * float(lm.delta.abs().max()))


def test_chained_memory_counts_every_frame_and_keeps_its_creation_time(model):
    fp = mem.fingerprint(model)
    gen = TTTLMGen(model, use_sampling=False)
    with gen.streaming(1):
        _run(gen, model, 1, CHUNK + 5, 5)
        first = mem.build(model, mem.take(model, 0), fp, now=10.0)
        gen.reset_streaming()
        mem.resume(model, 0, first, fp)
        _run(gen, model, 1, 2 * CHUNK + 1, 6)
        second = mem.build(model, mem.take(model, 0), fp, base=first, now=20.0)
    assert (first.frames, first.chunks) == (CHUNK + 5, 2)
    assert (second.frames, second.chunks) == (3 * CHUNK + 6, 5)
    assert (second.created, second.last_used) == (10.0, 20.0)
    assert all(lm.counters["updates"] == 5 for lm in second.layers.values())


@pytest.mark.parametrize("fmt", ["bf16", "rank:4"])
def test_lossy_formats_store_less_and_restore_close(model, fmt):
    fp = mem.fingerprint(model)
    gen = TTTLMGen(model, use_sampling=False)
    with gen.streaming(1):
        _run(gen, model, 1, 3 * CHUNK, 7)
        memory = mem.capture(model, 0, fp)
    exact, lossy = mf.dumps(memory), mf.dumps(memory, fmt)
    assert len(lossy) < len(exact) and mf.header(lossy)["compression"] == fmt
    back = mf.loads(lossy)
    assert back.compression == fmt
    for i, lm in memory.layers.items():
        rel = float(torch.linalg.matrix_norm(back.layers[i].delta - lm.delta) / torch.linalg.matrix_norm(lm.delta))
        assert 0 < rel < (2 ** -7 if fmt == "bf16" else 1.0), (i, rel)
    d, h, n = 64, 176, len(memory.layers)
    tensor_bytes = mf.nbytes("bf16", d, h, n) if fmt == "bf16" else mf.nbytes("rank", d, h, n, rank=4)
    assert tensor_bytes < len(lossy) < tensor_bytes + 4096  # the header is small


def test_foreign_damaged_and_newer_files_are_refused(model):
    fp = mem.fingerprint(model)
    gen = TTTLMGen(model, use_sampling=False)
    with gen.streaming(1):
        _run(gen, model, 1, CHUNK, 8)
        data = mf.dumps(mem.capture(model, 0, fp))
    with pytest.raises(mem.MemoryRefused, match="not a moshi-ttt memory file"):
        mf.loads(b"\x00" * 4)
    with pytest.raises(mem.MemoryRefused, match="has no 'moshi_ttt_memory' version"):
        mf.loads(st_save({"x": torch.zeros(2)}))
    with pytest.raises(mem.MemoryRefused, match="damaged"):
        mf.loads(data[:-10])
    n = struct.unpack("<Q", data[:8])[0]
    head = json.loads(data[8:8 + n])
    head["__metadata__"]["moshi_ttt_memory"] = "2"
    raw = json.dumps(head).encode()
    with pytest.raises(mem.MemoryRefused, match="format version '2', this code reads '1'"):
        mf.loads(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


@pytest.mark.parametrize("fmt, limit", [("exact", lambda d, h: d * h), ("bf16", lambda d, h: d * h // 2),
                                        ("rank:4", lambda d, h: 4 * (d + h) // 2)])
def test_the_factor_log_stops_at_the_formats_own_size(fmt, limit):
    """The device never holds a factor log bigger (in fp32 values) than the stored format's own form."""
    m = _model()
    gen = TTTLMGen(m, use_sampling=False)
    kept_some = dropped_some = False
    with gen.streaming(1):
        mem.keep_factors(m, comp=fmt)
        g = torch.Generator().manual_seed(3)
        for _ in range(6 * CHUNK + 2):
            gen.step(torch.randint(0, m.card, (1, 8, 1), generator=g))
            for gate in m.ttt_gatings().values():
                st = gate.ttt_state()
                d, h = st.w.shape[1:]
                rows = int(st.updates[0] + st.skipped[0]) * CHUNK
                log = st.factors[0]
                assert (log is None) == (rows * (d + h) >= limit(d, h)), (fmt, rows)
                if log is not None:
                    assert sum(z.shape[0] for _, z in log) == rows
                kept_some |= log is not None and rows > 0
                dropped_some |= log is None
    assert dropped_some and (kept_some or fmt.startswith("rank"))

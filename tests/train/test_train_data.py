"""Training data, loss, parameter sets and refusals of `moshi-ttt train` (fast: no training steps).

Refusals are checked through `train(cfg)` (every data file is validated before the model is loaded)
and once through the command line (exit code 2, one-line message).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil

import numpy as np
import pytest
import torch
from moshi.modules.lora import LoRALinear

from moshi_ttt.modules.transformer import TTT_KEY
from moshi_ttt.testing.speech import SAMPLE_RATE, write_wav
from moshi_ttt.train.config import TrainConfig
from moshi_ttt.train.data import BatchOrder, DataError, Dataset, TokenIds, read_alignments, text_stream
from moshi_ttt.train.loop import train
from moshi_ttt.train.loss import LossParts, global_loss, loss_parts

PAD, END_PAD, ZERO = 3, 0, -1


def cfg_for(tmp_path, repo, manifest, **over) -> TrainConfig:
    d = {"run_dir": str(tmp_path / "run"), "model": {"hf_repo": str(repo)},
         "data": {"train": str(manifest), "segment_frames": 48}, "max_steps": 1, "progress": False}
    for k, v in over.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    return TrainConfig.from_dict(d)


def copy_dataset(src_jsonl, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for p in src_jsonl.parent.iterdir():
        shutil.copy(p, dst / p.name)
    return dst / src_jsonl.name


@pytest.fixture(scope="module")
def tiny(train_repo):
    """(model in eval mode, mimi, tokenizer) of the tiny checkpoint."""
    from moshi_ttt.models.loaders import checkpoint_info, load_ttt_moshi

    info = checkpoint_info(str(train_repo))
    return load_ttt_moshi(info, dtype=torch.float32), info.get_mimi(), info.get_text_tokenizer()


# -- tokenisation -------------------------------------------------------------------------------------

def test_text_stream_follows_moshi_finetune_interleaver():
    # word A (2 tokens) starts at 0.25 s = frame 3.125 → first token at frame 3, end-of-padding at frame 2;
    # word B (1 token) at 0.8 s = frame 10; last_word_end of B = int(1.2 · 12.5) = 15 ⇒ frames ≤ 15 stay PAD.
    words = [([11, 12], 0.25, 0.6), ([13], 0.8, 1.2)]
    s = text_stream(words, 20, 12.5, PAD, END_PAD)
    assert s == [PAD, PAD, END_PAD, 11, 12, PAD, PAD, PAD, PAD, END_PAD, 13] + [PAD] * 9
    # a word starting (frame 1.125 → 1) before the previous word's tokens are out replaces the rest of them
    # (moshi-finetune with keep_and_shift=False)
    s = text_stream([([21, 22, 23], 0.0, 0.1), ([24], 0.09, 0.3)], 4, 12.5, PAD, END_PAD)
    assert s == [21, 24, PAD, PAD]


def test_segment_codes_layout(train_dataset, tiny):
    model, mimi, tok = tiny
    ds = Dataset(train_dataset, 48, 17, "SPEAKER_MAIN")
    assert [(s.recording, s.start_frame, s.real_frames) for s in ds.segments] == [(0, 0, 48), (0, 48, 34),
                                                                                   (1, 0, 48), (1, 48, 34)]
    ids = TokenIds.of(model)
    import sphn

    pcm, _ = sphn.read(str(ds.recordings[0].path), sample_rate=SAMPLE_RATE)
    for i in (0, 1):
        seg = ds.segments[i]
        codes = ds.codes(i, mimi, tok, ids)
        assert codes.shape == (17, 48) and codes.dtype == torch.int64
        a = seg.start_frame * 1920
        piece = np.zeros((2, seg.real_frames * 1920), np.float32)
        piece[:, :min(piece.shape[1], pcm.shape[1] - a)] = pcm[:, a:a + piece.shape[1]]
        with torch.no_grad():
            want = mimi.encode(torch.from_numpy(piece)[:, None])
        r = seg.real_frames
        assert torch.equal(codes[1:9, :r], want[0]), "streams 1-8 must be the left (Moshi) channel"
        assert torch.equal(codes[9:17, :r], want[1]), "streams 9-16 must be the right (user) channel"
        assert not torch.equal(codes[1:9, :r], codes[9:17, :r])
        assert len(set(codes[1, :r].tolist())) > 5  # real audio codes, not a constant
        assert (codes[:, r:] == ZERO).all()  # past the end of the audio: moshi's zero token everywhere
    # text: main-speaker words only, each word's first token on the frame of its start
    main = [w for w in ds.recordings[0].words if w.speaker == "SPEAKER_MAIN" and w.start < 48 / 12.5]
    other = [w for w in ds.recordings[0].words if w.speaker != "SPEAKER_MAIN"]
    text = ds.codes(0, mimi, tok, ids)[0].tolist()
    for w in main:
        t = math.floor(w.start * 12.5)
        assert text[t] == tok.encode(w.text)[0], (w, t, text)
        if t > 0 and text[t - 1] not in range(4, 64):
            assert text[t - 1] == END_PAD
    user_frames = range(math.ceil(other[0].start * 12.5), min(48, math.floor(other[-1].end * 12.5)))
    assert len(user_frames) > 10
    assert all(text[t] in (PAD, END_PAD) for t in user_frames), "the user's words must not be in the text stream"


def test_batch_order_shards_the_global_batch():
    o = BatchOrder(10, 4, seed=3)
    assert o.global_batch(0) == BatchOrder(10, 4, seed=3).global_batch(0)  # deterministic
    seen = [i for s in range(5) for i in o.global_batch(s)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))  # whole epochs
    for step in range(5):
        assert o.local_batch(step, 0, 2) + o.local_batch(step, 1, 2) == o.global_batch(step)
    with pytest.raises(ValueError, match="divisible"):
        o.local_batch(0, 0, 3)


# -- loss ---------------------------------------------------------------------------------------------

def test_loss_is_the_same_split_over_ranks(tiny):
    """Two 'ranks' with one item each, their weight totals all-reduced, sum to the 2-item loss."""
    model, _, _ = tiny
    torch.manual_seed(0)
    codes = torch.randint(0, 64, (2, 17, 40))
    codes[:, 1:] = torch.randint(0, 2048, (2, 16, 40))
    codes[0, 0, :10] = PAD
    codes[1, :, 30:] = ZERO
    with torch.no_grad():
        out = model(codes)
    kw = dict(audio_offset=1, dep_q=8, text_padding_ids={PAD, END_PAD}, text_padding_weight=0.5,
              first_codebook_weight_multiplier=2.0)
    full, _, _ = global_loss(loss_parts(out, codes, **kw))
    parts = []
    for b in range(2):
        o = type(out)(out.logits[b:b + 1], out.mask[b:b + 1], out.text_logits[b:b + 1], out.text_mask[b:b + 1])
        parts.append(loss_parts(o, codes[b:b + 1], **kw))

    def fake_all_reduce(t):
        t.copy_(torch.stack([parts[0].text_weight + parts[1].text_weight,
                             parts[0].audio_weight + parts[1].audio_weight]))
    split = sum(global_loss(p, fake_all_reduce)[0] for p in parts)
    assert split.item() == pytest.approx(full.item(), rel=1e-6)
    # by hand: the weights moshi-finetune uses
    p = loss_parts(out, codes, **kw)
    tw = out.text_mask.float()
    tw[(codes[:, :1] == PAD) | (codes[:, :1] == END_PAD)] *= 0.5
    aw = out.mask.float()
    aw[:, 0] *= 2.0
    assert p.text_weight.item() == pytest.approx(tw.sum().item())
    assert p.audio_weight.item() == pytest.approx(aw.sum().item())
    assert isinstance(p, LossParts)


# -- parameters ---------------------------------------------------------------------------------------

def test_lora_b_is_zero_initialised(train_repo):
    """moshi's LoRALinear leaves lora_B at nn.Linear's random init; `add_lora` zeroes it (as moshi-finetune),
    so the model is unchanged at step 0."""
    from moshi_ttt.models.loaders import checkpoint_info, load_ttt_moshi
    from moshi_ttt.train.params import add_lora, select_trainable

    assert LoRALinear(8, 8, 2, 2.0, dtype=torch.float32).lora_B.weight.abs().max() > 0
    model = load_ttt_moshi(checkpoint_info(str(train_repo)), dtype=torch.float32)
    codes = torch.randint(0, 64, (1, 17, 20))
    codes[:, 1:] = torch.randint(0, 2048, (1, 16, 20))
    with torch.no_grad():
        before = model(codes)
        add_lora(model, rank=4, scaling=2.0)
        after = model(codes)
    loras = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert loras and all(m.lora_B.weight.abs().max() == 0 for m in loras)
    assert torch.equal(before.logits[before.mask], after.logits[after.mask])
    names = select_trainable(model, "ttt+lora")
    assert any(".lora_A." in n for n in names) and any(TTT_KEY in n for n in names)
    assert not any(n.endswith("frozen_W.weight") for n in names)
    with pytest.raises(ValueError, match="already a LoRA"):
        add_lora(model, rank=4, scaling=2.0)


def test_trainable_sets(train_repo):
    from moshi_ttt.models.loaders import checkpoint_info, load_ttt_moshi
    from moshi_ttt.train.params import MasterParams, select_trainable

    model = load_ttt_moshi(checkpoint_info(str(train_repo)), dtype=torch.bfloat16)
    ttt = select_trainable(model, "ttt")
    assert ttt and all(TTT_KEY in n for n in ttt)
    wdown = select_trainable(model, "ttt+wdown")
    assert sorted(set(wdown) - set(ttt)) == ["transformer.layers.0.gating.linear_out.weight",
                                             "transformer.layers.2.gating.linear_out.weight"]
    assert len(select_trainable(model, "full")) == len(list(model.parameters()))
    named = dict(model.named_parameters())
    mp = MasterParams([(n, named[n]) for n in ttt])
    assert all(m.dtype == torch.float32 and m is not named[n] for n, m in mp.named_masters().items())


# -- refusals -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("data", [{"segment_frames": 16}, {"segment_frames": 10},
                                  {"segment_frames": None, "duration_sec": 1.28}])
def test_refuses_segment_not_longer_than_one_chunk(data, train_repo, train_dataset, tmp_path):
    with pytest.raises(ValueError) as e:
        train(cfg_for(tmp_path, train_repo, train_dataset, data=data))
    msg = str(e.value)
    assert "not longer than one TTT chunk (chunk_size=16)" in msg and "no gradient" in msg, msg
    assert "segment_frames" in msg


def test_refuses_min_segment_not_longer_than_one_chunk(train_repo, train_dataset, tmp_path):
    with pytest.raises(ValueError, match=r"data.min_segment_frames=16 .*no gradient"):
        train(cfg_for(tmp_path, train_repo, train_dataset, data={"min_segment_frames": 16}))


def test_refuses_missing_audio_file(train_repo, train_dataset, tmp_path):
    data = copy_dataset(train_dataset, tmp_path / "d")
    (tmp_path / "d" / "conv1.wav").unlink()
    with pytest.raises(DataError, match=r"train.jsonl:2: audio file not found: .*conv1\.wav"):
        train(cfg_for(tmp_path, train_repo, data))


@pytest.mark.parametrize("content, match", [
    ('{"alignments": [["hello", [0.1, 0.3], "SPEAKER_MAIN"]', r"malformed alignment JSON \("),
    ('{"words": []}', r'expected an object with an "alignments" list'),
    ('{"alignments": [["hello", [0.1, 0.3], "SPEAKER_MAIN"], ["there", [0.5], "SPEAKER_MAIN"]]}',
     r"alignments\[1\] = \['there', \[0.5\], 'SPEAKER_MAIN'\]; expected \[word, \[start_sec, end_sec\], speaker\]"),
    ('{"alignments": [["hello", ["a", 0.3], "SPEAKER_MAIN"]]}', r"alignments\[0\]"),
])
def test_refuses_malformed_alignment_json(content, match, train_repo, train_dataset, tmp_path):
    data = copy_dataset(train_dataset, tmp_path / "d")
    (tmp_path / "d" / "conv0.json").write_text(content)
    with pytest.raises(DataError, match=r"conv0\.json: .*" + match):
        train(cfg_for(tmp_path, train_repo, data))


def test_refuses_missing_alignment_json(train_dataset, tmp_path):
    data = copy_dataset(train_dataset, tmp_path / "d")
    (tmp_path / "d" / "conv0.json").unlink()
    with pytest.raises(DataError, match=r"alignment file not found: .*conv0\.json"):
        Dataset(data, 48, 17, "SPEAKER_MAIN")


def test_refuses_mono_wav(train_repo, train_dataset, tmp_path, capsys):
    data = copy_dataset(train_dataset, tmp_path / "d")
    write_wav(tmp_path / "d" / "conv0.wav", [np.zeros(SAMPLE_RATE * 5, np.float32)])  # mono
    with pytest.raises(DataError, match=r"train.jsonl:1: .*conv0\.wav has 1 channel\(s\); expected a stereo file"):
        train(cfg_for(tmp_path, train_repo, data))
    # the command line reports it in one line with exit code 2
    from moshi_ttt.train import command

    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(json.dumps(cfg_for(tmp_path, train_repo, data).to_dict()))  # JSON is YAML
    parser = argparse.ArgumentParser()
    command.add_args(parser)
    assert command.run(parser.parse_args([str(cfg_file)])) == 2  # after one info line naming the TTT layers
    err = capsys.readouterr().err.splitlines()
    errors = [line for line in err if line.startswith("moshi-ttt train: error: ")]
    assert len(errors) == 1 and "conv0.wav has 1 channel(s)" in errors[0] and "Traceback" not in "".join(err), err


def test_refuses_bad_manifest_lines(tmp_path):
    m = tmp_path / "m.jsonl"
    for line, match in [('{"path": "a.wav"}', r"m.jsonl:1: 'duration' must be a positive number"),
                        ("not json", r"m.jsonl:1: not valid JSON"),
                        ('{"duration": 3}', r"m.jsonl:1: expected \{\"path\""), ("", "lists no audio files")]:
        m.write_text(line + "\n")
        with pytest.raises(DataError, match=match):
            Dataset(m, 48, 17, "SPEAKER_MAIN")


def test_config_errors_name_the_field(tmp_path):
    base = {"run_dir": "r", "data": {"train": "t.jsonl", "segment_frames": 48}}
    for bad, match in [({"trainable": "lora"}, r"trainable='lora'"), ({"batch_size": 0}, r"batch_size=0"),
                       ({"data": {"train": "t.jsonl"}}, r"exactly one of data.segment_frames"),
                       ({"optim": {"lr": -1}}, r"optim.lr=-1"), ({"bogus": 1}, r"unknown key\(s\) \['bogus'\]"),
                       ({"ttt_clip_norm": 0}, r"ttt_clip_norm=0")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig.from_dict({**base, **bad})
    assert TrainConfig.from_dict(base).ttt_clip_norm is None  # clip off by default in training


def test_read_alignments_sorts_and_drops_empty_words(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps({"alignments": [["b", [1.0, 1.2], "S"], ["a", [0.2, 0.4], "S"], ["z", [2, 2], "S"]]}))
    assert [w.text for w in read_alignments(p, "x")] == ["a", "b"]


@pytest.mark.slow  # two backward passes, ~4.5 s
def test_gradient_checkpointing_gives_the_same_gradients(train_repo):
    import dataclasses

    from moshi_ttt.models.loaders import checkpoint_info, load_ttt_moshi
    from moshi_ttt.train.params import select_trainable

    info = checkpoint_info(str(train_repo))
    torch.manual_seed(0)
    codes = torch.randint(0, 64, (2, 17, 40))
    codes[:, 1:] = torch.randint(0, 2048, (2, 16, 40))
    conv_noise = torch.randn(64, 1, 5) * 0.1
    grads = []
    for gc in (False, True):
        lm = dict(info.lm_config, gradient_checkpointing=gc)
        model = load_ttt_moshi(dataclasses.replace(info, lm_config=lm), dtype=torch.float32).train()
        assert model.transformer.checkpointing is gc
        with torch.no_grad():
            for g in model.ttt_gatings().values():
                g.ttt.conv.weight.add_(conv_noise)  # so W_target gets a gradient too
        names = select_trainable(model, "full")
        out = model(codes)
        p = loss_parts(out, codes, 1, 8, {PAD, END_PAD}, 0.5, 1.0)
        global_loss(p)[0].backward()
        named = dict(model.named_parameters())
        grads.append({n: named[n].grad.clone() for n in names if ".gating." in n})
    assert any(".gating.ttt.w_target" in n and g.abs().max() > 0 for n, g in grads[0].items())
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


def test_yaml_numbers_without_a_dot_are_floats(tmp_path):
    """YAML 1.1 reads `1e-4` as a string; the config takes it as the number it means."""
    p = tmp_path / "t.yaml"
    p.write_text("run_dir: r\ndata: {train: t.jsonl, segment_frames: 48}\noptim: {lr: 3e-4, eps: 1e-8}\n")
    c = TrainConfig.load(p)
    assert c.optim.lr == 3e-4 and c.optim.eps == 1e-8
    assert c.run_dir == str(tmp_path / "r") and c.data.train == str(tmp_path / "t.jsonl")


def test_wdown_run_export_loads_alone(train_repo, train_dataset, tmp_path):
    """trainable ttt+wdown changes base weights: the export's model.safetensors holds every trained weight, so
    `--hf-repo RUN/export` loads the trained model without --ttt-weights."""
    from safetensors.torch import load_file

    from moshi_ttt.models.loaders import checkpoint_info, load_ttt_moshi
    from moshi_ttt.train.dist import setup
    from moshi_ttt.train.loop import Trainer

    cfg = cfg_for(tmp_path, train_repo, train_dataset, trainable="ttt+wdown", max_steps=1,
                  optim={"lr": 0.01}, log_fast_weights=False)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(cfg, setup(None))
        summary = trainer.run()
    finally:
        torch.set_num_threads(prev)
    loaded = load_ttt_moshi(checkpoint_info(summary["export"]), dtype=torch.float32).state_dict()
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(loaded[k], v), k
    w = "transformer.layers.2.gating.linear_out.weight"
    assert not torch.equal(load_file(str(train_repo / "model.safetensors"))[w], loaded[w])


def test_plain_kyutai_checkpoint_trains_the_default_ttt_layers(train_dataset, tmp_path, caplog):
    """A checkpoint in Kyutai's layout and no model.ttt_config: training resolves the shipped Moshi TTT defaults
    (layer 0 of the 4-layer tiny LM, chunk 256), logs them, and then holds the data to that chunk size."""
    import logging

    from moshi_ttt.models import demo as assets

    folder = assets.make_local_repo(tmp_path / "kyutai", ttt_in_weights=False, ttt_in_config=False)
    with caplog.at_level(logging.INFO, logger="moshi_ttt"), pytest.raises(ValueError) as e:
        train(cfg_for(tmp_path, folder, train_dataset))
    lines = [r.getMessage() for r in caplog.records if "TTT layers [" in r.getMessage()]
    assert len(lines) == 1 and "TTT layers [0] of 4" in lines[0] and "moshi7b_ttt" in lines[0], lines
    assert "not longer than one TTT chunk (chunk_size=256)" in str(e.value), e.value

"""`moshi-ttt infer` end to end: real speech (espeak-ng) → Mimi → LMGen on the TTT model → Mimi, run as a
subprocess on a tiny random checkpoint built by the test, with chunk_size 8 so several fast-weight
updates happen. Checks the output WAV length, the transcript, the telemetry (updates = ⌊frames / C⌋,
finite drift series), batching, and one-line user errors with exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sphn
import yaml

from moshi_ttt.apps.infer import output_paths, timed_text, timed_text_path, transcript
from moshi_ttt.models import demo as assets
from moshi_ttt.models.streams import FRAME, SAMPLE_RATE
from moshi_ttt.ttt.config import load_lm_and_ttt

from support import audio_match

ROOT = Path(__file__).resolve().parents[2]
CHUNK = 8
BATCH_ECHO_MIN = 0.45  # each item's echo correlation (measured 0.69 / 0.68: docs/demo.md)
MAX_DELAY = 1  # max(delays) of configs/tiny.yaml: LMGen needs one extra step to emit the last frame
ENV = dict(os.environ, NO_TORCH_COMPILE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def _ttt_cfg():
    """tiny's TTT section with chunk_size 8 and the next-token init (non-zero target ⇒ non-zero drift)."""
    _, ttt = load_lm_and_ttt("tiny")
    return dataclasses.replace(ttt, layer=dataclasses.replace(ttt.layer, chunk_size=CHUNK, init="ntp"))


@pytest.fixture(scope="module")
def speech_wav(speech) -> Path:
    path = speech.wav("infer")
    pcm, sr = sphn.read(str(path))
    assert 4.0 <= pcm.shape[-1] / sr <= 6.5, f"espeak-ng speech is {pcm.shape[-1] / sr:.2f} s"
    return path


@pytest.fixture(scope="module")
def stereo_wav(speech_wav) -> Path:
    """The same speech as a 2-channel file at its native (non-24 kHz) rate."""
    pcm, sr = sphn.read(str(speech_wav))
    path = speech_wav.with_name("stereo.wav")
    sphn.write_wav(str(path), np.concatenate([pcm[:1], 0.5 * pcm[:1]]).astype(np.float32), sample_rate=sr)
    return path


@pytest.fixture(scope="module")
def ttt_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "ttt8.yaml"
    path.write_text(yaml.safe_dump({"ttt": _ttt_cfg().to_dict()}))
    return path


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return assets.make_local_repo(tmp_path_factory.mktemp("repo"), seed=0, ttt=_ttt_cfg())


def _moshi_ttt() -> list[str]:
    script = Path(sys.executable).parent / "moshi-ttt"
    return [str(script)] if script.exists() else [sys.executable, "-m", "moshi_ttt"]


def _infer(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*_moshi_ttt(), "infer", *map(str, args)], cwd=ROOT, env=dict(ENV, **(env or {})),
                          capture_output=True, text=True, timeout=timeout)


def _samples_24k(path: Path) -> int:
    """Length of the input as infer sees it: resampled to 24 kHz by sphn."""
    return sphn.read(str(path), sample_rate=SAMPLE_RATE)[0].shape[-1]


def _check_run(infile: Path, wavs: list[Path], txts: list[Path], tel_path: Path, batch: int) -> dict:
    n_in = _samples_24k(infile)
    in_frames = math.ceil(n_in / FRAME)
    for wav, txt in zip(wavs, txts):
        pcm, sr = sphn.read(str(wav))
        assert sr == SAMPLE_RATE and pcm.shape[0] == 1
        assert abs(pcm.shape[-1] - n_in) < FRAME, (pcm.shape, n_in)
        assert pcm.shape[-1] == in_frames * FRAME
        assert np.isfinite(pcm).all() and np.abs(pcm).max() > 0
        assert txt.is_file()  # random weights: the text itself is meaningless
        assert "▁" not in txt.read_text()
        timed = json.loads(timed_text_path(txt).read_text())  # the same words as the transcript, each with its frame
        assert [w["word"] for w in timed["words"]] == txt.read_text().split()
        assert timed["frame_rate"] == 12.5 and timed["frames"] == in_frames
        frames = [t["frame"] for t in timed["tokens"]]
        assert frames == sorted(set(frames)) and all(1 <= f <= in_frames for f in frames)
        assert all(t["time"] == t["frame"] / 12.5 for t in timed["tokens"])
    tel = json.loads(tel_path.read_text())
    frames = tel["frames"]
    assert tel["input_frames"] == in_frames
    assert frames == in_frames + MAX_DELAY  # LM steps
    assert tel["output_frames"] == in_frames
    assert tel["chunk_size"] == CHUNK and tel["batch_size"] == batch
    assert frames // CHUNK >= 5  # several chunks happened
    assert tel["ttt_layers"] == [0, 2] and sorted(tel["layers"]) == ["0", "2"]
    assert tel["ms_per_frame"] > 0 and tel["seconds"] > 0 and "realtime_factor" not in tel
    # the one meaning of the real-time figure: audio seconds per wall second (> 1 is faster than real time)
    assert tel["audio_seconds"] == pytest.approx(n_in / 24000)
    assert tel["realtime_speed"] == pytest.approx(tel["audio_seconds"] / tel["seconds"])
    n_samples = len(tel["series_frames"])
    assert n_samples >= frames // CHUNK
    assert tel["series_frames"][: frames // CHUNK] == [CHUNK * (i + 1) for i in range(frames // CHUNK)]
    for layer in tel["layers"].values():
        assert layer["updates"] == [frames // CHUNK] * batch
        assert layer["clips"] == [0] * batch and layer["skipped"] == [0] * batch
        for name in ("drift", "last_delta_norm"):
            series = layer[name]
            assert len(series) == n_samples and all(len(s) == batch for s in series)
            assert all(isinstance(v, float) and math.isfinite(v) for s in series for v in s), name
        assert max(v for s in layer["drift"] for v in s) > 0  # ntp init: the fast weights did move
    return tel


@pytest.mark.slow
def test_infer_speech(speech_wav, repo, ttt_yaml, tmp_path):
    """B=1 on espeak-ng speech, the checkpoint given as a Hugging Face repo id resolved offline from a
    local huggingface_hub cache, and an explicit --ttt-config that agrees with the checkpoint's."""
    cache = tmp_path / "hf-cache"
    assets.install_in_hf_cache(repo, "kyutai-test/tiny-ttt-c8", cache)
    out = tmp_path / "out" / "answer.wav"
    proc = _infer(speech_wav, out, "--hf-repo", "kyutai-test/tiny-ttt-c8", "--ttt-config", ttt_yaml, "--seed", 1,
                  env={"HF_HUB_CACHE": str(cache), "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_run(speech_wav, [out], [out.with_suffix(".txt")], out.with_suffix(".ttt.json"), batch=1)


@pytest.mark.slow
def test_infer_batch_of_two_stereo_demo(stereo_wav, ttt_yaml, tmp_path):
    """--batch-size 2 on a stereo, non-24 kHz file with the built-in demo checkpoint: every item written
    with suffix _i, per-item telemetry."""
    out = tmp_path / "b" / "x.wav"
    proc = _infer(stereo_wav, out, "--demo", "--ttt-config", ttt_yaml, "--batch-size", 2,
                  "--transcript", tmp_path / "t.txt", "--telemetry", tmp_path / "tel.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    wavs = [tmp_path / "b" / "x_0.wav", tmp_path / "b" / "x_1.wav"]
    txts = [tmp_path / "t_0.txt", tmp_path / "t_1.txt"]
    assert not out.exists()
    _check_run(stereo_wav, wavs, txts, tmp_path / "tel.json", batch=2)
    # content: each item's reply is its own channel's echo (the demo's echo LM; docs/demo.md)
    pcm_in = sphn.read(str(stereo_wav), sample_rate=SAMPLE_RATE)[0]
    for i, w in enumerate(wavs):
        out = sphn.read(str(w))[0][0]
        echo = audio_match.delayed_mel_correlation(out, pcm_in[i], assets.ECHO_OUTPUT_FRAMES * FRAME)
        print(f"infer --demo --batch-size 2, item {i}: echo {echo:.3f}")
        assert echo >= BATCH_ECHO_MIN, (i, echo)


@pytest.mark.parametrize("kind", ["not_a_wav", "missing"])
def test_bad_input_file(kind, tmp_path):
    infile = tmp_path / "notes.wav"
    if kind == "not_a_wav":
        infile.write_text("these are meeting notes, not audio\n" * 20)
    proc = _infer(infile, tmp_path / "out.wav", "--demo", timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    err = proc.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert str(infile) in err
    assert not (tmp_path / "out.wav").exists()


def test_bad_ttt_config(speech_wav, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("ttt:\n  layer:\n    chunk_size: 0\n")
    proc = _infer(speech_wav, tmp_path / "out.wav", "--demo", "--ttt-config", cfg, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "chunk_size" in err and str(cfg) in err


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["folder", "files"])
def test_plain_kyutai_checkpoint_runs_with_the_default_ttt_layers(layout, speech_wav, tmp_path):
    """A checkpoint in Kyutai's layout (no "ttt" in config.json, no TTT tensors) and no TTT flag: infer runs the
    shipped Moshi TTT defaults (every 6th layer from 0 ⇒ layer 0 of the 4-layer tiny LM, chunk 256, zero init)
    and says so in one log line. As a folder (--hf-repo) or as files (--moshi-weight … --config-path …)."""
    folder = assets.make_local_repo(tmp_path / "kyutai", seed=0, ttt_in_weights=False, ttt_in_config=False)
    if layout == "folder":
        flags = ["--hf-repo", folder]
    else:
        flags = ["--hf-repo", folder, "--moshi-weight", folder / "model.safetensors",
                 "--config-path", folder / "config.json", "--mimi-weight", folder / "mimi.safetensors",
                 "--tokenizer", next(folder.glob("*.model"))]
    out = tmp_path / "out.wav"
    proc = _infer(speech_wav, out, *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if "TTT layers [" in ln]
    assert len(lines) == 1 and "TTT layers [0] of 4" in lines[0] and "moshi7b_ttt" in lines[0], lines
    tel = json.loads(out.with_suffix(".ttt.json").read_text())
    assert tel["ttt_layers"] == [0] and tel["chunk_size"] == 256
    assert tel["output_frames"] == tel["input_frames"] and out.is_file()


def test_transcript_and_output_names():
    class Tok:
        pieces = {0: "<unk>", 3: "<pad>", 5: "▁hello", 6: "▁the", 7: "re"}

        def id_to_piece(self, i):
            return self.pieces[i]
    assert transcript(Tok(), [3, 0, 5, 3, 6, 7, 0]) == "hello there"
    wavs, txts, tel = output_paths("d/out.wav", 1)
    assert (wavs, txts, tel) == ([Path("d/out.wav")], [Path("d/out.txt")], Path("d/out.ttt.json"))
    wavs, txts, tel = output_paths("d/out.wav", 2, transcript="t.txt")
    assert wavs == [Path("d/out_0.wav"), Path("d/out_1.wav")] and txts == [Path("t_0.txt"), Path("t_1.txt")]
    assert timed_text_path(Path("d/out_1.txt")) == Path("d/out_1.text.json")


def test_timed_text_gives_each_word_its_output_frame():
    """Output k of LMGen is Moshi's frame k + 1: a word's frame and time (frame / 12.5) are those of its first
    piece; padding ids are skipped; "▁" alone ends a word; the words are the transcript's."""
    class Tok:
        pieces = {0: "<unk>", 3: "<pad>", 5: "▁sev", 6: "en", 7: "▁", 8: "two", 9: "▁nine"}

        def id_to_piece(self, i):
            return self.pieces[i]
    ids = [3, 3, 0, 5, 6, 3, 7, 8, 3, 3, 9]
    timed = timed_text(Tok(), ids, 12.5)
    assert [(w["word"], w["frame"], w["time"]) for w in timed["words"]] == [
        ("seven", 4, 4 / 12.5), ("two", 8, 8 / 12.5), ("nine", 11, 11 / 12.5)]
    assert [(t["frame"], t["id"], t["piece"]) for t in timed["tokens"]] == [
        (4, 5, "▁sev"), (5, 6, "en"), (7, 7, "▁"), (8, 8, "two"), (11, 9, "▁nine")]
    assert " ".join(w["word"] for w in timed["words"]) == transcript(Tok(), ids)
    assert timed["frames"] == len(ids) and timed["first_frame"] == 1


@pytest.mark.slow  # three infer runs, ~8 s
def test_infer_memory_chains_conversations_and_refuses_another_model(speech_wav, stereo_wav, ttt_yaml, tmp_path):
    """A.wav with --save-memory, then B.wav with --memory: B starts from exactly the fast weights A ended
    with (every frame of A, its last partial chunk included); a memory of another TTT config is refused."""
    m_a, m_b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    proc = _infer(speech_wav, tmp_path / "a.wav", "--demo", "--ttt-config", ttt_yaml, "--save-memory", m_a)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _infer(stereo_wav, tmp_path / "b.wav", "--demo", "--ttt-config", ttt_yaml, "--memory", m_a,
                  "--save-memory", m_b, "--memory-format", "bf16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    tel_a = json.loads((tmp_path / "a.ttt.json").read_text())
    tel_b = json.loads((tmp_path / "b.ttt.json").read_text())
    end_a, start_b = tel_a["memory"]["end"], tel_b["memory"]["start"]
    assert tel_a["memory"]["start"] == {k: {"drift": 0.0, "delta_sum": 0.0, "updates": 0} for k in ("0", "2")}
    assert end_a["frames"] == tel_a["frames"] and end_a["chunks"] == -(-tel_a["frames"] // CHUNK)
    assert tel_a["frames"] % CHUNK  # A ends inside a chunk: that partial chunk is in the memory
    for k, layer in end_a["layers"].items():
        assert layer["updates"] == -(-tel_a["frames"] // CHUNK) == tel_a["layers"][k]["updates"][0] + 1
        assert layer["drift"] > 0
        assert math.isclose(start_b[k]["drift"], layer["drift"], rel_tol=1e-6), (k, start_b[k], layer)
        assert math.isclose(start_b[k]["delta_sum"], layer["delta_sum"], rel_tol=1e-5, abs_tol=1e-7)
        assert start_b[k]["updates"] == layer["updates"]
    assert tel_b["memory"]["loaded"]["frames"] == end_a["frames"]
    end_b = tel_b["memory"]["end"]
    assert end_b["frames"] == tel_a["frames"] + tel_b["frames"] and end_b["compression"] == "bf16"
    assert end_b["created"] == end_a["created"]

    other = tmp_path / "other.yaml"
    cfg = _ttt_cfg()
    other.write_text(yaml.safe_dump({"ttt": dataclasses.replace(cfg, layer=dataclasses.replace(
        cfg.layer, lr=cfg.layer.lr * 2)).to_dict()}))
    proc = _infer(speech_wav, tmp_path / "c.wav", "--demo", "--ttt-config", other, "--memory", m_a)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    errors = [line for line in err.splitlines() if "error:" in line]  # (an INFO line names the TTT config source)
    assert "Traceback" not in err and len(errors) == 1 and "another model or TTT config" in errors[0], err
    assert not (tmp_path / "c.wav").exists()


@pytest.mark.slow  # three demo infer runs, ~10 s
def test_an_input_folder_runs_its_files_as_batched_conversations(speech_wav, tmp_path):
    """An input folder: each file is a conversation, stepped in batches of --batch-size; a shorter file's outputs
    are cut to its own frames, and (greedy) it gets exactly what it gets alone: its own KV cache and fast weights,
    whatever shares its batch."""
    pcm, sr = sphn.read(str(speech_wav), sample_rate=SAMPLE_RATE)
    folder = tmp_path / "in"
    folder.mkdir()
    sphn.write_wav(str(folder / "a_long.wav"), pcm[0], sample_rate=SAMPLE_RATE)
    sphn.write_wav(str(folder / "b_short.wav"), pcm[0, : 2 * SAMPLE_RATE], sample_rate=SAMPLE_RATE)
    sphn.write_wav(str(folder / "c_rev.wav"), pcm[0, ::-1].copy(), sample_rate=SAMPLE_RATE)
    (folder / "notes.txt").write_text("not audio")
    greedy = ["--demo", "--temp", "0", "--temp-text", "0"]
    proc = _infer(folder, tmp_path / "out", "--batch-size", 2, *greedy)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tels = [json.loads((tmp_path / "out" / f"batch_{k}.ttt.json").read_text()) for k in (0, 1)]
    assert [[Path(i["infile"]).name for i in t["items"]] for t in tels] == [["a_long.wav", "b_short.wav"],
                                                                          ["c_rev.wav"]]
    assert tels[0]["batch_size"] == 2 and tels[1]["batch_size"] == 1
    full = math.ceil(pcm.shape[-1] / FRAME)
    for name, n in [("a_long", full), ("b_short", 25), ("c_rev", full)]:
        out, _ = sphn.read(str(tmp_path / "out" / f"{name}.wav"))
        assert out.shape[-1] == n * FRAME, name
        timed = json.loads((tmp_path / "out" / f"{name}.text.json").read_text())
        assert timed["frames"] == n
    alone = tmp_path / "alone.wav"
    proc = _infer(folder / "b_short.wav", alone, *greedy)
    assert proc.returncode == 0, proc.stderr[-3000:]
    batched, _ = sphn.read(str(tmp_path / "out" / "b_short.wav"))
    single, _ = sphn.read(str(alone))
    assert np.abs(batched - single).max() < 1e-4, np.abs(batched - single).max()
    proc = _infer(folder, tmp_path / "x", "--demo", "--transcript", tmp_path / "t.txt")
    assert proc.returncode == 2 and "not with an input folder" in proc.stderr


@pytest.mark.slow  # four demo infer runs, ~14 s
def test_an_input_folder_saves_and_resumes_one_memory_per_conversation(speech_wav, ttt_yaml, tmp_path):
    """--save-memory / --memory with an input folder: NAME's memory is taken when NAME ends (its own frames and the
    LM's delay), so a short conversation batched with a long one saves what it saves alone; a folder of memories
    resumes each input from its own; a missing memory or a file for a folder is refused up front."""
    pcm, _ = sphn.read(str(speech_wav), sample_rate=SAMPLE_RATE)
    folder, again = tmp_path / "in", tmp_path / "again"
    folder.mkdir(), again.mkdir()
    sphn.write_wav(str(folder / "a_long.wav"), pcm[0], sample_rate=SAMPLE_RATE)
    sphn.write_wav(str(folder / "b_short.wav"), pcm[0, : 2 * SAMPLE_RATE], sample_rate=SAMPLE_RATE)
    sphn.write_wav(str(again / "b_short.wav"), pcm[0, ::-1].copy(), sample_rate=SAMPLE_RATE)
    run = ["--demo", "--ttt-config", ttt_yaml, "--temp", "0", "--temp-text", "0"]
    mems = tmp_path / "mems"
    proc = _infer(folder, tmp_path / "out", "--batch-size", 2, "--save-memory", mems, *run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    items = json.loads((tmp_path / "out" / "batch_0.ttt.json").read_text())["memory"]["items"]
    proc = _infer(folder / "b_short.wav", tmp_path / "alone.wav", "--save-memory", tmp_path / "alone.safetensors", *run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    alone = json.loads((tmp_path / "alone.ttt.json").read_text())["memory"]["end"]
    short, long = items[1]["end"], items[0]["end"]
    assert short["path"] == str(mems / "b_short.safetensors") and long["path"] == str(mems / "a_long.safetensors")
    assert short["frames"] == alone["frames"] < long["frames"]
    for k, layer in alone["layers"].items():
        assert short["layers"][k]["updates"] == layer["updates"] < long["layers"][k]["updates"]
        assert math.isclose(short["layers"][k]["drift"], layer["drift"], rel_tol=1e-4), (k, short, layer)
    proc = _infer(again, tmp_path / "out2", "--memory", mems, *run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = json.loads((tmp_path / "out2" / "batch_0.ttt.json").read_text())["memory"]["items"][0]
    assert resumed["loaded"]["frames"] == short["frames"]
    for k, layer in short["layers"].items():
        assert math.isclose(resumed["start"][k]["drift"], layer["drift"], rel_tol=1e-6)
        assert resumed["start"][k]["updates"] == layer["updates"]
    (mems / "b_short.safetensors").unlink()
    proc = _infer(again, tmp_path / "out3", "--memory", mems, *run)
    assert proc.returncode == 2 and "no memory for 1 input(s): b_short.safetensors" in proc.stderr, proc.stderr
    proc = _infer(again, tmp_path / "out3", "--save-memory", tmp_path / "alone.safetensors", *run)
    assert proc.returncode == 2 and "must be a folder, not a file" in proc.stderr, proc.stderr
    assert not (tmp_path / "out3").exists()

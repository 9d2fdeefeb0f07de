"""Shared test setup. Keep small: add fixtures, do not rewrite existing ones."""

import os

# moshi reads this at import time; without it its gating kernel is compiled by Inductor on CPU.
os.environ.setdefault("NO_TORCH_COMPILE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

# Small TTT layer used by tests/test_layer_*.py: d = 16, dim_feedforward 60 ⇒ h = 40, C = 8.
LAYER_DIM, LAYER_FF, LAYER_CHUNK = 16, 60, 8


def _make_ttt_layer(dtype=torch.float64, perturb=True, seed=0, **cfg_kw):
    """A TTTGating (d=16, h=40) with `chunk_size=8, lr=0.05, init="ntp"` unless overridden in cfg_kw.
    perturb=True adds random noise to the target params (conv, W_target) so no test relies on the
    special structure of the `ntp` init."""
    from moshi_ttt.config import TTTConfig
    from moshi_ttt.layer import TTTGating

    torch.manual_seed(seed)
    cfg = TTTConfig(**{"chunk_size": LAYER_CHUNK, "lr": 0.05, "init": "ntp", **cfg_kw})
    g = TTTGating(LAYER_DIM, LAYER_FF, F.silu, cfg, dtype=dtype)
    if perturb:
        with torch.no_grad():
            if g.ttt.conv is not None:
                g.ttt.conv.weight.add_(0.2 * torch.randn_like(g.ttt.conv.weight))
            if g.ttt.w_target is not None:
                g.ttt.w_target.add_(0.1 * torch.randn_like(g.ttt.w_target))
    return g


@pytest.fixture
def make_ttt_layer():
    """Factory fixture: make_ttt_layer(dtype=..., perturb=True, seed=0, **TTTConfig kwargs)."""
    return _make_ttt_layer


def _stream_calls(g, x, x0, sizes):
    """Feeds x, x0 [B, T, d] to a streaming layer in calls of `sizes` frames; returns [B, T, d]."""
    assert sum(sizes) == x.shape[1]
    outs, t = [], 0
    for s in sizes:
        outs.append(g(x[:, t:t + s], x0[:, t:t + s]))
        t += s
    return torch.cat(outs, dim=1)


@pytest.fixture
def stream_calls():
    """stream_calls(layer, x, x0, sizes) → output; call inside `with layer.streaming(B):`."""
    return _stream_calls


# ---- server tests (tests/test_server_*.py) -------------------------------------------------------

def _server_espeak(path, text: str, voice: str = "en") -> None:
    import shutil
    import subprocess

    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.fail("espeak-ng is not installed: the server tests need real speech. Run `make sysdeps` "
                    "(apt-get install -y espeak-ng sox)")
    subprocess.run([exe, "-v", voice, "-w", str(path), text], check=True, capture_output=True)


@pytest.fixture(scope="session")
def server_speech(tmp_path_factory):
    """Two real speech clips (espeak-ng) as float32 24 kHz mono numpy arrays: {"a": ~6 s, "b": ~3.5 s}."""
    import sphn

    d = tmp_path_factory.mktemp("server_speech")
    clips = {"a": ("en", "Hello there, this is a test of test time training inside Moshi. "
                         "The weather is nice and the sun is out."),
             "b": ("en+f3", "Tell me a story about a cat and a dog, please, right now.")}
    out = {}
    for name, (voice, text) in clips.items():
        _server_espeak(d / f"{name}.wav", text, voice)
        pcm, sr = sphn.read(str(d / f"{name}.wav"), sample_rate=24000)
        assert sr == 24000 and pcm.shape[-1] > 24000, (sr, pcm.shape)
        out[name] = pcm[0].astype("float32")
    return out


_PROM_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"


def _parse_prometheus(text: str) -> dict:
    """Strict parser of the Prometheus text format 0.0.4 → {family: {"type", "help", "samples": [(name,
    labels dict, value)]}}. Raises AssertionError on any malformed line, a sample without a TYPE, a
    duplicate TYPE, or an inconsistent histogram."""
    import math
    import re

    sample_re = re.compile(rf"^({_PROM_NAME})(\{{(.*)\}})?\s+(\S+)(\s+-?\d+)?$")
    label_re = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(,|$)')
    fams: dict = {}

    def family_of(name: str) -> str:
        if name in fams:
            return name
        for suffix in ("_bucket", "_sum", "_count"):
            base = name[: -len(suffix)]
            if name.endswith(suffix) and base in fams and fams[base]["type"] in ("histogram", "summary"):
                return base
        raise AssertionError(f"sample {name!r} has no preceding # TYPE")

    assert text.endswith("\n"), "exposition must end with a newline"
    for ln, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                assert re.fullmatch(_PROM_NAME, parts[2]), f"line {ln}: bad metric name {parts[2]!r}"
                fam = fams.setdefault(parts[2], {"type": None, "help": None, "samples": []})
                if parts[1] == "TYPE":
                    assert fam["type"] is None, f"line {ln}: duplicate TYPE for {parts[2]}"
                    assert len(parts) == 4 and parts[3] in ("counter", "gauge", "histogram", "summary", "untyped"), \
                        f"line {ln}: bad TYPE line {line!r}"
                    assert not fam["samples"], f"line {ln}: TYPE after samples of {parts[2]}"
                    fam["type"] = parts[3]
                else:
                    fam["help"] = parts[3] if len(parts) == 4 else ""
            continue
        m = sample_re.match(line)
        assert m, f"line {ln}: not a valid sample line: {line!r}"
        name, _, label_text, value = m.group(1), m.group(2), m.group(3), m.group(4)
        labels = {}
        if label_text:
            pos = 0
            while pos < len(label_text):
                lm = label_re.match(label_text, pos)
                assert lm and lm.end() > pos, f"line {ln}: bad labels {label_text!r}"
                labels[lm.group(1)] = lm.group(2)
                pos = lm.end()
        try:
            v = float(value.replace("+Inf", "inf").replace("-Inf", "-inf"))
        except ValueError:
            raise AssertionError(f"line {ln}: bad value {value!r}") from None
        fam = family_of(name)
        assert fams[fam]["type"] is not None, f"line {ln}: sample of {fam} before its TYPE"
        fams[fam]["samples"].append((name, labels, v))
    for fam_name, fam in fams.items():
        assert fam["type"] is not None, f"{fam_name}: HELP without TYPE"
        if fam["type"] == "counter":
            assert all(v >= 0 for _, _, v in fam["samples"]), f"{fam_name}: negative counter"
        if fam["type"] == "histogram":
            buckets = [(lb, v) for n, lb, v in fam["samples"] if n == fam_name + "_bucket"]
            assert buckets and buckets[-1][0].get("le") == "+Inf", f"{fam_name}: missing +Inf bucket"
            les = [float(lb["le"].replace("+Inf", "inf")) for lb, _ in buckets]
            assert les == sorted(les), f"{fam_name}: buckets not sorted"
            counts = [v for _, v in buckets]
            assert counts == sorted(counts), f"{fam_name}: buckets not cumulative"
            count = [v for n, _, v in fam["samples"] if n == fam_name + "_count"]
            total = [v for n, _, v in fam["samples"] if n == fam_name + "_sum"]
            assert count == [counts[-1]] and len(total) == 1 and not math.isnan(total[0]), \
                f"{fam_name}: _count/_sum inconsistent with buckets"
    return fams


@pytest.fixture
def parse_prometheus():
    """parse_prometheus(text) → {family: {"type", "help", "samples": [(name, labels, value)]}} (strict)."""
    return _parse_prometheus


@pytest.fixture
def torch_single_thread():
    """Runs a test with one intra-op thread (restored after). The TTT layer tests run thousands of tiny
    ops, for which OpenMP thread handoff dominates: 10× slower with 2 threads on a busy 2-core box."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


# ---- training tests (tests/test_train*.py) -------------------------------------------------------

TRAIN_SR = 24000
# (text, voice): two utterances for the main speaker (left channel), one for the user (right channel)
_TRAIN_UTTERANCES = [("hello there how are you today", "en"), ("tell me a story about a cat", "en"),
                     ("I am fine thank you and you", "en+f3")]


def write_wav(path, channels, sr: int = TRAIN_SR) -> None:
    """16-bit WAV with one row of `channels` (float arrays in [-1, 1]) per channel (sphn writes mono only)."""
    import wave

    import numpy as np

    data = np.clip(np.stack([np.asarray(c, dtype=np.float32) for c in channels]).T, -1, 1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(data.shape[1])
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes((data * 32767).astype("<i2").tobytes())


def _even_words(text: str, start: float, dur: float, speaker: str) -> list:
    """Approximate word alignments: the utterance's words evenly spaced over its duration."""
    words = text.split()
    step = dur / len(words)
    return [[w, [round(start + k * step, 3), round(start + (k + 1) * step - 0.02, 3)], speaker]
            for k, w in enumerate(words)]


@pytest.fixture(scope="session")
def train_dataset(tmp_path_factory):
    """A moshi-finetune dataset: train.jsonl + 2 stereo 24 kHz WAVs of 6.5 s (espeak-ng speech; left = main
    speaker saying two utterances, right = user saying one in between) + alignment JSONs (SPEAKER_MAIN /
    SPEAKER_OTHER, evenly spaced word timings). At 12.5 Hz and 48-frame segments: 4 segments (48 + 34)."""
    import json

    import numpy as np
    import sphn

    d = tmp_path_factory.mktemp("train_data")
    pcms = []
    for i, (text, voice) in enumerate(_TRAIN_UTTERANCES):
        _server_espeak(d / f"utt{i}.wav", text, voice)
        pcm, _ = sphn.read(str(d / f"utt{i}.wav"), sample_rate=TRAIN_SR)
        (d / f"utt{i}.wav").unlink()
        pcms.append(pcm[0].astype(np.float32))
    total = int(6.5 * TRAIN_SR)
    lines = []
    for f, (first, second) in enumerate([(0, 1), (1, 0)]):
        left, right = np.zeros(total, np.float32), np.zeros(total, np.float32)
        words = []
        for ch, u, t, spk in [(left, first, 0.2, "SPEAKER_MAIN"), (right, 2, 2.3, "SPEAKER_OTHER"),
                              (left, second, 4.4, "SPEAKER_MAIN")]:
            a = int(t * TRAIN_SR)
            seg = pcms[u][: total - a]
            ch[a:a + len(seg)] += seg
            words += _even_words(_TRAIN_UTTERANCES[u][0], t, len(seg) / TRAIN_SR, spk)
        wav = d / f"conv{f}.wav"
        write_wav(wav, [left, right])
        wav.with_suffix(".json").write_text(json.dumps({"alignments": words}))
        lines.append(json.dumps({"path": wav.name, "duration": total / TRAIN_SR}))
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    return d / "train.jsonl"


@pytest.fixture(scope="session")
def train_repo(tmp_path_factory, train_dataset):
    """The tiny TTT checkpoint folder (`assets.make_local_repo`, chunk_size 16) whose random Mimi gets
    speech-fitted codebooks: make_local_repo's Mimi has all-zero codebooks (`embedding_sum` = 0), so it
    encodes any audio to code 0 in every codebook. moshi's own k-means init (run once on the dataset's
    latents, 5 iterations instead of 50) gives codes that vary with the audio."""
    import functools
    from unittest import mock

    import sphn
    from moshi.quantization import core_vq
    from safetensors.torch import save_file

    from moshi_ttt.assets import make_local_repo
    from moshi_ttt.checkpoint import checkpoint_info

    repo = make_local_repo(tmp_path_factory.mktemp("train_repo"))
    mimi = checkpoint_info(str(repo)).get_mimi()
    pcm = torch.cat([torch.from_numpy(sphn.read(str(p), sample_rate=TRAIN_SR)[0])
                     for p in sorted(train_dataset.parent.glob("conv*.wav"))], dim=-1)[:, None]
    kmeans = functools.partial(core_vq._run_kmeans, num_iters=5)
    with torch.no_grad(), mock.patch.object(core_vq, "_run_kmeans", kmeans):
        latent = mimi._encode_to_unquantized_latent(pcm)
        mimi.quantizer.train()
        for _ in range(8):  # one RVQ level initialises per pass (each after the previous one)
            mimi.quantizer(latent, mimi.frame_rate)
        mimi.eval()
    books = [m for n, m in mimi.named_modules() if n.endswith("_codebook")]
    assert books and all(b.initialized for b in books)
    save_file({k: v.contiguous() for k, v in mimi.state_dict().items()}, str(repo / "mimi.safetensors"))
    return repo

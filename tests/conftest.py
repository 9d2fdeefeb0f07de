"""Shared test setup. Keep small: add fixtures, do not rewrite existing ones."""

import os
from pathlib import Path

# moshi reads this at import time; without it its gating kernel is compiled by Inductor on CPU.
os.environ.setdefault("NO_TORCH_COMPILE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from moshi_ttt.testing.speech import SAMPLE_RATE, write_wav  # noqa: E402

# ---- markers: a test under tests/<folder>/ gets the marker <folder> (with --strict-markers, a folder must be
# registered in pyproject.toml's markers: ttt, modules, models, server, train, e2e) ---------------------------

TESTS = Path(__file__).resolve().parent


def _folder_of(path) -> str | None:
    """tests/<folder>/.../test_x.py → <folder>; None for tests/test_*.py and files outside tests/."""
    path = Path(path).resolve()
    rel = path.relative_to(TESTS).parts if path.is_relative_to(TESTS) else ()
    return rel[0] if len(rel) > 1 else None


def pytest_collection_modifyitems(config, items):
    for item in items:
        folder = _folder_of(item.path)
        if folder is not None:
            item.add_marker(folder)


# ---- real speech (espeak-ng through moshi_ttt.testing.speech) -----------------------------------------------

# name → (voice, espeak speed or None, text); synthesised on first use, once per test session.
SPEECH_CLIPS = {
    "a": ("en", None, "Hello there, this is a test of test time training inside Moshi. "
                      "The weather is nice and the sun is out."),  # ~6 s
    "b": ("en+f3", None, "Tell me a story about a cat and a dog, please, right now."),  # ~3.5 s
    "infer": ("en", None, "Hello there. This is a short test of test time training inside Moshi. "
                          "The weather is nice today."),  # 4 to 6.5 s
    "web": ("en", 150, "Hello Moshi. I would like to test how your fast weights change while we talk. "
                       "Tell me about the weather, the sea and the mountains."),
    "train0": ("en", None, "hello there how are you today"),
    "train1": ("en", None, "tell me a story about a cat"),
    "train2": ("en+f3", None, "I am fine thank you and you"),
    # content tests of the echo demo: four speakers and texts the demo's training never saw
    "echo0": ("en-gb-x-gbclan+f3", None, "Seven silver spoons fell from the kitchen table onto the floor."),
    "echo1": ("en-gb-x-gbcwmd+m2", None, "Please bring the green umbrella, it might rain this afternoon."),
    "echo2": ("en-us+f4", 150, "Numbers one two three four five, and then six."),
    "echo3": ("en-gb-scotland+m3", 200, "Winter mornings are quiet and the frozen lake shines."),
    "echo4": ("en-029+f1", 170, "A bicycle with a blue basket waits outside the bakery."),
}


class Speech:
    """Real speech clips of `SPEECH_CLIPS`: `wav(name)` the espeak-ng WAV (its own rate, mono), `pcm(name)`
    float32 24 kHz mono. Fails the test (with the install hint) when espeak-ng is missing."""

    def __init__(self, folder):
        self.folder = folder
        self._pcm: dict = {}

    def wav(self, name: str):
        from moshi_ttt.testing.speech import SpeechUnavailable, espeak_wav

        path = self.folder / f"{name}.wav"
        if not path.exists():
            voice, speed, text = SPEECH_CLIPS[name]
            try:
                espeak_wav(path, text, voice, speed)
            except SpeechUnavailable as e:
                pytest.fail(str(e))
        return path

    def pcm(self, name: str):
        import sphn

        if name not in self._pcm:
            pcm, sr = sphn.read(str(self.wav(name)), sample_rate=24000)
            assert sr == 24000 and pcm.shape[-1] > 12000, (name, sr, pcm.shape)
            self._pcm[name] = pcm[0].astype("float32")
        return self._pcm[name]


@pytest.fixture(scope="session")
def speech(tmp_path_factory) -> Speech:
    """The one source of real speech in the tests (see `Speech`)."""
    return Speech(tmp_path_factory.mktemp("speech"))


# ---- server tests (tests/test_server_*.py, tests/test_web_client.py) --------------------------------

@pytest.fixture(scope="session")
def server_speech(speech):
    """Two real speech clips as float32 24 kHz mono numpy arrays: {"a": ~6 s, "b": ~3.5 s}."""
    return {"a": speech.pcm("a"), "b": speech.pcm("b")}


@pytest.fixture(scope="session")
def demo_ttt_yaml(tmp_path_factory):
    """demo_ttt_yaml(**layer_overrides) → a TTT YAML: the shipped configs/demo_ttt.yaml (next-token init, so the
    fast weights visibly move), with the given `layer` fields replaced (e.g. chunk_size=8)."""
    import dataclasses

    import yaml

    from moshi_ttt.ttt.config import load_ttt_config

    folder = tmp_path_factory.mktemp("demo_ttt")

    def make(**layer):
        cfg = load_ttt_config("demo_ttt")
        cfg = dataclasses.replace(cfg, layer=dataclasses.replace(cfg.layer, **layer))
        path = folder / ("demo_ttt" + "".join(f"_{k}{v}" for k, v in sorted(layer.items())) + ".yaml")
        path.write_text(yaml.safe_dump({"ttt": cfg.to_dict()}))
        return path
    return make


@pytest.fixture
def torch_single_thread():
    """Runs a test with one intra-op thread (restored after). The TTT layer tests run thousands of tiny
    ops, for which OpenMP thread handoff dominates: 10× slower with 2 threads on a busy 2-core box."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


# ---- training tests (tests/test_train*.py) -------------------------------------------------------

# SPEECH_CLIPS "train0..2": two utterances for the main speaker (left channel), one for the user (right channel)
_TRAIN_TEXTS = [SPEECH_CLIPS[f"train{i}"][2] for i in range(3)]


def _even_words(text: str, start: float, dur: float, speaker: str) -> list:
    """Approximate word alignments: the utterance's words evenly spaced over its duration."""
    words = text.split()
    step = dur / len(words)
    return [[w, [round(start + k * step, 3), round(start + (k + 1) * step - 0.02, 3)], speaker]
            for k, w in enumerate(words)]


@pytest.fixture(scope="session")
def train_dataset(tmp_path_factory, speech):
    """A moshi-finetune dataset: train.jsonl + 2 stereo 24 kHz WAVs of 6.5 s (espeak-ng speech; left = main
    speaker saying two utterances, right = user saying one in between) + alignment JSONs (SPEAKER_MAIN /
    SPEAKER_OTHER, evenly spaced word timings). At 12.5 Hz and 48-frame segments: 4 segments (48 + 34)."""
    import json

    import numpy as np

    d = tmp_path_factory.mktemp("train_data")
    pcms = [speech.pcm(f"train{i}") for i in range(len(_TRAIN_TEXTS))]
    total = int(6.5 * SAMPLE_RATE)
    lines = []
    for f, (first, second) in enumerate([(0, 1), (1, 0)]):
        left, right = np.zeros(total, np.float32), np.zeros(total, np.float32)
        words = []
        for ch, u, t, spk in [(left, first, 0.2, "SPEAKER_MAIN"), (right, 2, 2.3, "SPEAKER_OTHER"),
                              (left, second, 4.4, "SPEAKER_MAIN")]:
            a = int(t * SAMPLE_RATE)
            seg = pcms[u][: total - a]
            ch[a:a + len(seg)] += seg
            words += _even_words(_TRAIN_TEXTS[u], t, len(seg) / SAMPLE_RATE, spk)
        wav = d / f"conv{f}.wav"
        write_wav(wav, [left, right])
        wav.with_suffix(".json").write_text(json.dumps({"alignments": words}))
        lines.append(json.dumps({"path": wav.name, "duration": total / SAMPLE_RATE}))
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    return d / "train.jsonl"


@pytest.fixture(scope="session")
def train_repo(tmp_path_factory, train_dataset):
    """The tiny TTT checkpoint folder (`assets.make_local_repo`, chunk_size 16) whose random Mimi's codebooks
    are refitted on the dataset's speech: make_local_repo's Mimi is fitted on synthetic tones and noise, so
    its codes follow speech only coarsely. moshi's own k-means init (run once on the dataset's latents,
    5 iterations instead of 50) gives codes that follow this speech."""
    import functools
    from unittest import mock

    import sphn
    from moshi.quantization import core_vq
    from safetensors.torch import save_file

    from moshi_ttt.models.demo import make_local_repo
    from moshi_ttt.models.loaders import checkpoint_info

    repo = make_local_repo(tmp_path_factory.mktemp("train_repo"))
    mimi = checkpoint_info(str(repo)).get_mimi()
    pcm = torch.cat([torch.from_numpy(sphn.read(str(p), sample_rate=SAMPLE_RATE)[0])
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

"""Real speech for tests, benchmarks and experiments: espeak-ng WAVs (Debian package `espeak-ng`).

The one place that synthesises speech; everything else calls `espeak_wav` / `espeak_pcm`.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from moshi_ttt.models.streams import SAMPLE_RATE


class SpeechUnavailable(RuntimeError):
    """espeak-ng is not installed."""


def espeak_wav(path: str | Path, text: str, voice: str = "en", speed: int | None = None,
               pitch: int | None = None) -> Path:
    """Writes `text` spoken by espeak-ng to the WAV `path` (espeak's own rate, mono) and returns it.
    `speed` in words per minute (espeak's default 175), `pitch` 0..99 (default 50)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SpeechUnavailable("espeak-ng is not installed: real speech needs it. Run `make sysdeps` "
                                "(apt-get install -y espeak-ng sox)")
    cmd = [exe, "-v", voice, "-w", str(path)]
    if speed is not None:
        cmd += ["-s", str(int(speed))]
    if pitch is not None:
        cmd += ["-p", str(int(pitch))]
    subprocess.run(cmd + [text], check=True, capture_output=True, timeout=60)
    return Path(path)


def espeak_pcm(text: str, voice: str = "en", speed: int | None = None,
               sample_rate: int = SAMPLE_RATE, pitch: int | None = None) -> np.ndarray:
    """`text` spoken by espeak-ng as float32 mono PCM [n] at `sample_rate` (24 kHz: Mimi's rate)."""
    import sphn

    with tempfile.TemporaryDirectory() as d:
        wav = espeak_wav(Path(d) / "speech.wav", text, voice, speed, pitch)
        pcm, _ = sphn.read(str(wav), sample_rate=sample_rate)
    return pcm[0].astype(np.float32)


def write_wav(path: str | Path, channels, sample_rate: int = SAMPLE_RATE) -> Path:
    """A 16-bit WAV with one channel per row of `channels` (float arrays in [-1, 1], clipped; sphn writes mono
    only), e.g. the stereo conversations of a training dataset."""
    import wave

    data = np.clip(np.stack([np.asarray(c, dtype=np.float32) for c in channels]).T, -1, 1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(data.shape[1])
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes((data * 32767).astype("<i2").tobytes())
    return Path(path)


# Voices (espeak-ng language + variant) for varied synthetic speakers. The last two never appear in
# the demo codec's / echo LM's training data: held-out speakers for evaluation.
TRAIN_VOICES = ("en", "en-us", "en-gb-scotland", "en-029", "en-us-nyc", "en-gb-x-rp", "en+f2", "en-us+f4",
                "en-gb-scotland+m3", "en-029+f1", "en+m5", "en-us+klatt")
HELD_OUT_VOICES = ("en-gb-x-gbclan+f3", "en-gb-x-gbcwmd+m2")

_WORDS = {
    "subject": "the cat|a small dog|my friend|the old man|her sister|the teacher|a robot|the children|our "
               "neighbour|the pilot|this machine|a tired student|the singer|his brother|the farmer",
    "verb": "found|painted|carried|watched|cooked|opened|dropped|followed|repaired|counted|bought|sold|"
            "remembered|forgot|described|washed|moved|wanted",
    "object": "a red box|the green door|seven apples|a heavy stone|the broken radio|two yellow birds|a long "
              "letter|the silver key|some warm bread|a wooden chair|the blue kite|three paper boats|a map",
    "tail": "in the morning|after lunch|near the river|before the rain|at the station|under the bridge|very "
            "slowly|with great care|on a cold day|behind the house|last summer|again and again|at night",
}


def sentences(n: int, seed: int) -> list[str]:
    """`n` distinct pseudo-random English sentences ("subject verb object tail"), deterministic in `seed`."""
    import random

    rng = random.Random(seed)
    parts = {k: v.split("|") for k, v in _WORDS.items()}
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        s = " ".join(rng.choice(parts[k]) for k in ("subject", "verb", "object", "tail"))
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def varied_speech(texts: list[str], voices: tuple[str, ...], seed: int) -> list[np.ndarray]:
    """Each text spoken by espeak-ng with a voice from `voices` (in turn), a random rate (120–260 wpm) and
    pitch (20–80), peak-normalised to 0.5: float32 PCM [n] at 24 kHz each. Deterministic in `seed`
    (one process, the inputs fixed before synthesis)."""
    import random

    rng = random.Random(seed)
    out = []
    for i, text in enumerate(texts):
        pcm = espeak_pcm(text, voices[i % len(voices)], speed=rng.randint(120, 260), pitch=rng.randint(20, 80))
        out.append((0.5 / max(float(np.abs(pcm).max()), 1e-6) * pcm).astype(np.float32))
    return out

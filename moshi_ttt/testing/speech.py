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


def espeak_wav(path: str | Path, text: str, voice: str = "en", speed: int | None = None) -> Path:
    """Writes `text` spoken by espeak-ng to the WAV `path` (espeak's own rate, mono) and returns it."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SpeechUnavailable("espeak-ng is not installed: real speech needs it. Run `make sysdeps` "
                                "(apt-get install -y espeak-ng sox)")
    cmd = [exe, "-v", voice, "-w", str(path)]
    if speed is not None:
        cmd += ["-s", str(int(speed))]
    subprocess.run(cmd + [text], check=True, capture_output=True, timeout=60)
    return Path(path)


def espeak_pcm(text: str, voice: str = "en", speed: int | None = None,
               sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """`text` spoken by espeak-ng as float32 mono PCM [n] at `sample_rate` (24 kHz: Mimi's rate)."""
    import sphn

    with tempfile.TemporaryDirectory() as d:
        wav = espeak_wav(Path(d) / "speech.wav", text, voice, speed)
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

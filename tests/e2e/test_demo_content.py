"""`moshi-ttt infer --demo` carries content end to end: speech in, the echo LM's reply out.

The demo checkpoint (trained codec + echo LM, see docs/demo.md) repeats the user's audio
`ECHO_OUTPUT_FRAMES` frames later. The reply's mel spectrogram must match the input delayed by that much,
and not an unrelated utterance. Thresholds: docs/demo.md (measured figures, with margin).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sphn

from moshi_ttt.models import demo

from support import audio_match

ROOT = Path(__file__).resolve().parents[2]
FRAME = 1920
DELAY = demo.ECHO_OUTPUT_FRAMES * FRAME
ECHO_MIN = 0.4  # the reply's echo correlation with its own input (measured 0.57: docs/demo.md)
MARGIN = 0.3  # … and how much better than unrelated / undelayed (measured 0.49 / 0.66)


def _moshi_ttt() -> list[str]:
    script = Path(sys.executable).parent / "moshi-ttt"
    return [str(script)] if script.exists() else [sys.executable, "-m", "moshi_ttt"]


@pytest.fixture(scope="module")
def demo_reply(speech, tmp_path_factory):
    """(input PCM, reply PCM) of `infer --demo --ttt-config configs/demo_ttt.yaml` on clip "echo0"."""
    d = tmp_path_factory.mktemp("demo_content")
    pcm = speech.pcm("echo0")
    sphn.write_wav(str(d / "in.wav"), np.concatenate([pcm, np.zeros(DELAY + 2 * FRAME, np.float32)]),
                   sample_rate=24000)
    env = dict(os.environ, NO_TORCH_COMPILE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               MOSHI_TTT_CACHE=str(d / "cache"))
    r = subprocess.run(_moshi_ttt() + ["infer", "--demo", "--ttt-config", str(ROOT / "configs" / "demo_ttt.yaml"),
                                       str(d / "in.wav"), str(d / "out.wav")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out, _ = sphn.read(str(d / "out.wav"), sample_rate=24000)
    return pcm, out[0], (d / "out.txt").read_text()


def test_infer_demo_reply_is_the_input_one_echo_delay_later(demo_reply, speech):
    pcm, out, _ = demo_reply
    echo = audio_match.delayed_mel_correlation(out, pcm, DELAY)
    unrelated = audio_match.delayed_mel_correlation(out, speech.pcm("echo1"), DELAY)
    undelayed = audio_match.mel_correlation(out, pcm)
    print(f"infer --demo: echo {echo:.3f}, unrelated {unrelated:.3f}, undelayed {undelayed:.3f}")
    assert echo >= ECHO_MIN, (echo, unrelated, undelayed)
    assert echo - unrelated >= MARGIN, (echo, unrelated)
    assert echo - undelayed >= MARGIN, (echo, undelayed)  # the reply comes one echo delay later, not at once


def test_infer_demo_reply_is_silent_before_the_echo_and_text_is_padding(demo_reply):
    pcm, out, text = demo_reply
    rms = lambda x: float(np.sqrt(np.mean(np.square(x))))  # noqa: E731
    print(f"infer --demo: RMS before the echo {rms(out[: DELAY - 2 * FRAME]):.4f}, during it "
          f"{rms(out[DELAY: DELAY + len(pcm)]):.4f}; text {text.strip()!r}")
    # the first 0.8 s of the reply (before any echo can start) is much quieter than the echo itself
    assert rms(out[: DELAY - 2 * FRAME]) < 0.25 * rms(out[DELAY: DELAY + len(pcm)]), rms(out[: DELAY - 2 * FRAME])
    assert len(text.strip()) <= 5, text  # the echo LM's text stream is padding

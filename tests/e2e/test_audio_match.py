"""The content measures of the end-to-end tests (`support.audio_match`) and the varied-speech
helpers of `moshi_ttt.testing.speech` behave as the content tests assume."""

import numpy as np
import pytest

from moshi_ttt.testing import speech as speech_lib

from support import audio_match

FRAME = 1920


@pytest.fixture(scope="module")
def two_utterances(speech):
    return speech.pcm("echo0"), speech.pcm("echo1")


def test_mel_correlation_same_delayed_unrelated_and_buzz(two_utterances):
    a, b = two_utterances
    assert audio_match.mel_correlation(a, a) == pytest.approx(1.0, abs=1e-6)
    assert audio_match.mel_correlation(a, b) < 0.3
    buzz = np.tile(0.1 * np.sin(np.arange(FRAME) * 2 * np.pi / FRAME * 40), len(a) // FRAME + 1).astype(np.float32)
    assert abs(audio_match.mel_correlation(buzz, a)) < 0.05  # a steady 40 ms frame repeated: no content
    delay = 12 * FRAME
    echo = np.concatenate([np.zeros(delay + 500, np.float32), 0.3 * a])  # quieter, 500 samples of extra latency
    assert audio_match.delayed_mel_correlation(echo, a, delay) < audio_match.echo_correlation(echo, a, delay, FRAME)
    assert audio_match.echo_correlation(echo, a, delay, FRAME) > 0.95
    m = audio_match.echo_matrix([echo, np.concatenate([np.zeros(delay, np.float32), b])], [a, b], delay, FRAME)
    assert m[0, 0] > 0.95 and m[1, 1] > 0.95 and m[0, 1] < 0.3 and m[1, 0] < 0.3, m


def test_best_echo_finds_an_unknown_delay(two_utterances):
    a, b = two_utterances
    echo = np.concatenate([np.zeros(31 * 240, np.float32), 0.5 * a])  # 0.31 s late
    corr, delay = audio_match.best_echo(echo, a, 24000)
    assert corr > 0.95 and delay == 31 * 240, (corr, delay)
    assert audio_match.best_echo(echo, b, 24000)[0] < 0.5  # searching delays does not make b match a


def test_si_snr(two_utterances):
    a, b = two_utterances
    assert audio_match.si_snr(a, 0.5 * a) > 100  # scale-invariant
    noisy = a + np.random.default_rng(0).normal(0, float(np.std(a)), len(a)).astype(np.float32)
    assert audio_match.si_snr(a, noisy) == pytest.approx(0.0, abs=0.5)  # equal signal and noise power
    assert audio_match.si_snr(a, b) < -10


def test_sentences_and_voices_are_deterministic_and_distinct():
    s = speech_lib.sentences(50, seed=3)
    assert s == speech_lib.sentences(50, seed=3) and len(set(s)) == 50
    assert s != speech_lib.sentences(50, seed=4)
    assert not set(speech_lib.TRAIN_VOICES) & set(speech_lib.HELD_OUT_VOICES)
    with pytest.raises(ValueError, match="mono"):
        audio_match.log_mel(np.zeros((2, 4000), np.float32))

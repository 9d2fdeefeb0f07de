"""Content-level audio comparison: does what came back sound like what went in?

`mel_correlation` is the Pearson correlation of two log-mel spectrograms after removing each mel band's
mean over time (so the shared average spectral tilt of any speech does not count): ≈ 1 for the same
sound, ≈ 0 for unrelated sounds or a steady buzz. `si_snr` is the scale-invariant SNR in dB. Both take
float PCM [n] at 24 kHz (numpy or torch); the longer input is cut to the shorter one's length.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

SAMPLE_RATE = 24000
HOP = 240  # 10 ms mel frames
N_FFT = 1024
N_MELS = 64


@functools.lru_cache(maxsize=4)
def mel_filters(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 60.0, fmax: float = 8000.0) -> torch.Tensor:
    """Triangular mel filterbank [n_mels, n_fft // 2 + 1] (HTK mel scale)."""
    def mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def hz(m):
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    edges = hz(np.linspace(mel(fmin), mel(fmax), n_mels + 2))
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    fb = np.maximum(0.0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))
    return torch.from_numpy(fb).float()


def _as_tensor(pcm) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(pcm, dtype=np.float32) if not torch.is_tensor(pcm) else pcm).float()
    if x.dim() != 1:
        raise ValueError(f"expected mono PCM [n], got shape {tuple(x.shape)}")
    return x


def log_mel(pcm, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """log(mel power + 1e-5) [n_frames, N_MELS], 10 ms hop."""
    x = _as_tensor(pcm)
    if x.numel() < N_FFT:
        x = torch.nn.functional.pad(x, (0, N_FFT - x.numel()))
    spec = torch.stft(x, N_FFT, HOP, window=torch.hann_window(N_FFT), return_complex=True, center=False)
    power = spec.abs().pow(2)
    return torch.log(mel_filters(sample_rate, N_FFT, N_MELS) @ power + 1e-5).T


def mel_correlation(a, b, sample_rate: int = SAMPLE_RATE) -> float:
    """Pearson correlation of the band-centred log-mels of `a` and `b` (cut to the shorter)."""
    return _mel_frames_correlation(log_mel(a, sample_rate), log_mel(b, sample_rate))


def _mel_frames_correlation(ma: torch.Tensor, mb: torch.Tensor) -> float:
    n = min(len(ma), len(mb))
    if n < 2:
        raise ValueError(f"too short to compare: {n} mel frames")
    ma, mb = ma[:n] - ma[:n].mean(0), mb[:n] - mb[:n].mean(0)
    den = math.sqrt(float(ma.pow(2).sum()) * float(mb.pow(2).sum()))
    return float((ma * mb).sum()) / den if den > 0 else 0.0


def delayed_mel_correlation(out, ref, delay_samples: int, sample_rate: int = SAMPLE_RATE) -> float:
    """`mel_correlation` of `out` from `delay_samples` on with `ref` from its start: how well `out`
    repeats `ref` `delay_samples` later."""
    out = _as_tensor(out)
    return mel_correlation(out[delay_samples:], _as_tensor(ref), sample_rate)


def si_snr(ref, est) -> float:
    """Scale-invariant signal-to-noise ratio of `est` against `ref` in dB (zero-mean, cut to the shorter)."""
    r, e = _as_tensor(ref).double(), _as_tensor(est).double()
    n = min(r.numel(), e.numel())
    r, e = r[:n] - r[:n].mean(), e[:n] - e[:n].mean()
    target = (e @ r) / (r @ r).clamp_min(1e-12) * r
    noise = e - target
    return 10 * math.log10(float(target @ target) / max(float(noise @ noise), 1e-12) + 1e-12)


def echo_correlation(out, ref, delay_samples: int, slack_samples: int = 0,
                     sample_rate: int = SAMPLE_RATE) -> float:
    """The best `delayed_mel_correlation` of `out` with `ref` over delays delay_samples … delay_samples +
    slack_samples (10 ms steps): how well `out` repeats `ref` about `delay_samples` later, allowing for
    a transport's small extra latency (Opus, buffering)."""
    return max(delayed_mel_correlation(out, ref, d, sample_rate)
               for d in range(delay_samples, delay_samples + slack_samples + 1, HOP))


def echo_matrix(outs: list, refs: list, delay_samples: int, slack_samples: int = 0) -> np.ndarray:
    """[len(outs), len(refs)]: `echo_correlation` of each output with each reference; a system without
    cross-talk has its row maximum on the diagonal."""
    return np.array([[echo_correlation(o, r, delay_samples, slack_samples) for r in refs] for o in outs])


def best_echo(out, ref, max_delay_samples: int, sample_rate: int = SAMPLE_RATE) -> tuple[float, int]:
    """(correlation, delay in samples) of the best `delayed_mel_correlation` of `out` with `ref` over delays
    0 … max_delay_samples in 10 ms steps: for a reply whose delay is not known (a browser's microphone
    starts before the connection does)."""
    mo, mr = log_mel(out, sample_rate), log_mel(ref, sample_rate)
    best = max((_mel_frames_correlation(mo[d:], mr), d) for d in range(0, max_delay_samples // HOP + 1)
               if len(mo) - d >= 2)
    return best[0], best[1] * HOP

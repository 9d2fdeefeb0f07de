"""Trains the demo's reduced Mimi (moshi's MimiModel with `tiny_mimi_config()`) as a speech autoencoder.

Data: espeak-ng sentences (`testing.speech.sentences`) in 12 voices with random rates and pitches, joined
with random pauses, random gain and a little white noise; random 0.96 s crops. SEANet convolutions
re-initialised at unit gain (`init_seanet`); Adam (0.5, 0.9). Loss: multi-resolution log-magnitude and
log-mel L1 + 0.1 × waveform L1 + moshi's RVQ commitment penalty; moshi's own quantizer (EMA codebooks,
dead-code replacement), bypassed for the first `--unquantized-steps`, then for half of each batch (Mimi's
recipe); 4 codebooks (the demo's) on 3 steps in 4, all 8 else. Finally the output gain is calibrated
on training audio (`calibrate_gain`).
Deterministic given --seed and --threads. Evaluates on held-out sentences in held-out voices (mel
correlation, SI-SNR, see `support.audio_match`) and writes the weights and the figures (JSON).

    python scripts/train_demo_codec.py                      # the shipped weights (≈ 14 min, 1 thread)
    python scripts/train_demo_codec.py --steps 20 --out /tmp/m.safetensors --figures /tmp/f.json   # smoke
    python scripts/train_demo_codec.py --eval-only moshi_ttt/models/demo_assets/mimi.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # moshi_ttt from the checkout; tests/support

from moshi.models import loaders  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from moshi_ttt.models import demo  # noqa: E402
from moshi_ttt.testing import speech  # noqa: E402
from moshi_ttt.utils import provenance  # noqa: E402

from support import audio_match  # noqa: E402

SR = 24000
CROP = 12 * 1920  # 0.96 s: 12 Mimi frames
FFTS = (256, 512, 1024, 2048)


def training_stream(seed: int, n_sentences: int) -> torch.Tensor:
    """The training audio, one float32 stream [n]: utterances with 0–0.6 s pauses, gain 0.2–1, noise."""
    rng = random.Random(seed)
    pcms = speech.varied_speech(speech.sentences(n_sentences, seed), speech.TRAIN_VOICES, seed)
    parts = []
    for pcm in pcms:
        parts.append(np.zeros(int(rng.uniform(0.0, 0.6) * SR), np.float32))
        parts.append(rng.uniform(0.2, 1.0) * pcm)
    x = torch.from_numpy(np.concatenate(parts))
    gen = torch.Generator().manual_seed(seed)
    noise_std = 10 ** (-4 + 1.5 * torch.rand(len(x) // SR + 1, generator=gen))  # per second, 1e-4 .. 3e-3
    return x + torch.randn(len(x), generator=gen) * noise_std.repeat_interleave(SR)[: len(x)]


def held_out(seed: int, n: int = 12) -> list[np.ndarray]:
    """`n` utterances the training never saw: other sentences, the held-out voices."""
    train = set(speech.sentences(400, seed))
    texts = [s for s in speech.sentences(400 + 4 * n, seed + 1000) if s not in train][:n]
    return speech.varied_speech(texts, speech.HELD_OUT_VOICES, seed + 1000)


def spectral_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Multi-resolution spectral loss of `y` against `x` ([B, n]): per FFT size, L1 of log magnitudes and
    L1 of log mel energies (no spectral-convergence term: it rewards a quieter output when unsure)."""
    loss = x.new_zeros(())
    for n in FFTS:
        w = torch.hann_window(n)
        sx = torch.stft(x, n, n // 4, window=w, return_complex=True).abs()
        sy = torch.stft(y, n, n // 4, window=w, return_complex=True).abs()
        fb = audio_match.mel_filters(SR, n, 64 if n >= 1024 else 32, 0.0, SR / 2)
        loss = loss + (torch.log(sx + 1e-5) - torch.log(sy + 1e-5)).abs().mean()
        loss = loss + (torch.log(fb @ sx.pow(2) + 1e-5) - torch.log(fb @ sy.pow(2) + 1e-5)).abs().mean()
    return loss / len(FFTS)


def init_seanet(mimi) -> None:
    """Re-initialises the SEANet convolutions: unit-gain (Kaiming, linear) weights and zero biases.

    With PyTorch's default init the signal shrinks layer by layer and the biases dominate: the latent of
    speech differs from that of silence by ≈ 3 % of its RMS, and the decoder learns to ignore it
    (docs/demo.md, "Why the first attempt did not learn")."""
    for name, m in mimi.named_modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)) and name.startswith(("encoder.", "decoder.")):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)


def pitch_track(pcm: np.ndarray, hop: int = 240, win: int = 960) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per 10 ms frame: autocorrelation pitch (Hz, 60–400 Hz), its periodicity (normalised autocorrelation
    peak, 1 = a pure tone), and whether the frame is loud (energy > 1 % of the loudest)."""
    frames = np.lib.stride_tricks.sliding_window_view(pcm, win)[::hop]
    frames = frames - frames.mean(1, keepdims=True)
    energy = (frames ** 2).mean(1)
    ac = np.fft.irfft(np.abs(np.fft.rfft(frames, 2 * win)) ** 2)[:, : win]
    ac = ac / np.maximum(ac[:, :1], 1e-12)
    lo, hi = SR // 400, SR // 60
    lag = lo + ac[:, lo:hi].argmax(1)
    return SR / lag, ac[np.arange(len(ac)), lag], energy > 1e-2 * energy.max()


def listening_proxies(ref: np.ndarray, out: np.ndarray) -> dict:
    """What a listener would notice, as numbers: loudness (RMS ratio), syllable rhythm (correlation of the
    10 ms log-RMS envelopes), per-0.3 s mel correlation (a word or syllable at a time, speech segments only),
    and voicing (periodicity: median autocorrelation peak of loud frames; share of voiced frames; pitch
    error in semitones where both are voiced, None if never)."""
    n = min(len(ref), len(out))
    ref, out = ref[:n], out[:n]
    env = [np.log(np.sqrt((np.lib.stride_tricks.sliding_window_view(v, 480)[::240] ** 2).mean(1)) + 1e-4)
           for v in (ref, out)]
    seg, segs = int(0.3 * SR), []
    loud = np.sqrt(np.mean(ref ** 2))
    for i in range(0, n - seg + 1, seg):
        if np.sqrt(np.mean(ref[i:i + seg] ** 2)) > 0.3 * loud:
            segs.append(audio_match.mel_correlation(ref[i:i + seg], out[i:i + seg]))
    (fr, pr, lr), (fo, po, lo) = pitch_track(ref), pitch_track(out)
    vr, vo = lr & (pr > 0.5), lo & (po > 0.5)  # voiced frames
    both = vr & vo
    return {"rms_ratio": float(np.sqrt(np.mean(out ** 2)) / max(loud, 1e-12)),
            "envelope_correlation": float(np.corrcoef(env[0], env[1])[0, 1]),
            "segment_mel_median": float(np.median(segs)), "segments_above_0_5": float(np.mean(np.array(segs) > 0.5)),
            "periodicity_in": float(np.median(pr[lr])), "periodicity_out": float(np.median(po[lo])),
            "voiced_in": float(vr.mean()), "voiced_out": float(vo.mean()),
            "f0_error_semitones": float(np.median(np.abs(12 * np.log2(fo[both] / fr[both])))) if both.any() else None}


@torch.no_grad()
def evaluate(mimi, utterances: list[np.ndarray], n_q: int, proxies: bool = False) -> dict:
    """Mean held-out mel correlation and SI-SNR of encode → decode with `n_q` codebooks (and the means of
    `listening_proxies` if `proxies`)."""
    mimi.eval()
    mimi.set_num_codebooks(n_q)
    mels, snrs, notes = [], [], []
    for pcm in utterances:
        n = math.ceil(len(pcm) / 1920) * 1920
        x = torch.nn.functional.pad(torch.from_numpy(pcm), (0, n - len(pcm)))[None, None]
        y = mimi.decode(mimi.encode(x))[0, 0, : len(pcm)]
        mels.append(audio_match.mel_correlation(pcm, y))
        snrs.append(audio_match.si_snr(pcm, y))
        if proxies:
            notes.append(listening_proxies(pcm, y.numpy()))
    rec = {"n_q": n_q, "mel_correlation": float(np.mean(mels)), "mel_correlation_min": float(np.min(mels)),
           "si_snr_db": float(np.mean(snrs)), "utterances": len(utterances)}
    if proxies:
        rec["listening"] = {k: float(np.mean([d[k] for d in notes if d[k] is not None]))
                            if any(d[k] is not None for d in notes) else None for k in notes[0]}
    return rec


def random_codec():
    """The demo codec before trained weights shipped (DEMO_VERSION 4): random weights, codebooks fitted on
    synthetic audio (still what the tests' random checkpoints use)."""
    mimi = loaders.get_mimi(None, mimi_config=demo.tiny_mimi_config())
    mimi.load_state_dict(demo.random_mimi_state(0))
    return mimi


def set_bypass(mimi, rate: float) -> None:
    """Probability that a training batch row skips quantization (moshi's `no_quantization_rate`)."""
    for rvq in (mimi.quantizer.rvq_first, mimi.quantizer.rvq_rest):
        rvq.no_quantization_rate = rate


@torch.no_grad()
def calibrate_gain(mimi, stream: torch.Tensor, seed: int, n: int = 32) -> float:
    """Scales the decoder's last convolution (linear: nothing follows it) so that `n` random 0.96 s crops
    of the training audio decode (4 codebooks) at their own RMS; returns the gain. The spectral losses
    leave the output ≈ 9 dB too quiet; the codes do not change."""
    gen = torch.Generator().manual_seed(seed + 2)
    starts = torch.randint(0, len(stream) - CROP, (n,), generator=gen)
    x = torch.stack([stream[s:s + CROP] for s in starts.tolist()])[:, None]
    mimi.eval()
    mimi.set_num_codebooks(4)
    y = mimi.decode(mimi.encode(x))[..., :CROP]
    gain = float(x.pow(2).mean().sqrt() / y.pow(2).mean().sqrt())
    last = mimi.decoder.model[-1].conv.conv
    last.weight.mul_(gain)
    last.bias.mul_(gain)
    return gain


def train(args) -> dict:
    torch.manual_seed(args.seed)
    mimi = loaders.get_mimi(None, mimi_config=demo.tiny_mimi_config())
    init_seanet(mimi)
    mimi.train()
    stream = training_stream(args.seed, args.sentences)
    print(f"training audio: {len(stream) / SR / 60:.1f} min", file=sys.stderr)
    opt = torch.optim.Adam(mimi.parameters(), lr=args.lr, betas=(0.5, 0.9))
    warm = min(100, args.steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))))
    gen = torch.Generator().manual_seed(args.seed + 1)
    probe = held_out(args.seed)[:4]  # progress display only (no choice depends on it)
    t0 = time.perf_counter()
    bar = tqdm(range(args.steps), desc="codec", file=sys.stderr, mininterval=5)
    done = 0
    for step in bar:
        if args.minutes and time.perf_counter() - t0 > 60 * args.minutes:
            break
        set_bypass(mimi, 1.0 if step < args.unquantized_steps else 0.5)
        starts = torch.randint(0, len(stream) - CROP, (args.batch,), generator=gen)
        x = torch.stack([stream[s:s + CROP] for s in starts.tolist()])[:, None]
        mimi.set_num_codebooks(4 if torch.rand((), generator=gen) < 0.75 else 8)
        res = mimi(x)
        y = res.x
        spec = spectral_loss(x[:, 0], y[:, 0])
        wave = (x - y).abs().mean()
        loss = spec + 0.1 * wave + res.penalty
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(mimi.parameters(), 1.0)
        opt.step()
        sched.step()
        done = step + 1
        if step % 25 == 0:
            bar.set_postfix(spec=f"{spec.item():.3f}", l1=f"{wave.item():.4f}", commit=f"{res.penalty.item():.4f}")
        if done % 500 == 0:
            tqdm.write(f"step {done}: probe mel correlation (4 codebooks) "
                       f"{evaluate(mimi, probe, 4)['mel_correlation']:.3f}", file=sys.stderr)
            mimi.train()
    wall = time.perf_counter() - t0
    gain = calibrate_gain(mimi, stream, args.seed)
    return {"mimi": mimi, "steps": done, "wall_s": wall, "s_per_step": wall / max(done, 1), "output_gain": gain,
            "final_spectral_loss": float(spec), "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps (default: the shipped weights)")
    p.add_argument("--unquantized-steps", type=int, default=300,
                   help="first steps without quantization; then half of each batch is quantized")
    p.add_argument("--minutes", type=float, default=0, help="stop early after this many minutes (0: never)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--sentences", type=int, default=400, help="training sentences")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: bit-reproducible; others within noise)")
    p.add_argument("--out", default=str(demo.DEMO_ASSETS / "mimi.safetensors"))
    p.add_argument("--figures", default=str(ROOT / "docs" / "demo_codec.json"))
    p.add_argument("--eval-only", metavar="WEIGHTS", help="only evaluate these weights (and the random codec)")
    args = p.parse_args(argv)
    start = provenance.started()
    torch.set_num_threads(args.threads)
    utts = held_out(args.seed)
    rec: dict = {"seed": args.seed}
    if args.eval_only:
        mimi = loaders.get_mimi(None, mimi_config=demo.tiny_mimi_config())
        mimi.load_state_dict(demo.float_state(load_file(args.eval_only)))
    else:
        run = train(args)
        mimi = run.pop("mimi")
        rec.update(run, batch=args.batch, lr=args.lr, unquantized_steps=args.unquantized_steps,
                   sentences=args.sentences, requested_steps=args.steps)
        state = demo.half_state(mimi.state_dict())
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save_file(state, args.out)
        mimi.load_state_dict(demo.float_state(state))  # evaluate exactly what ships
        print(f"wrote {args.out}", file=sys.stderr)
    random_mimi = random_codec()
    rec["trained"] = {f"q{n}": evaluate(mimi, utts, n, proxies=True) for n in (4, 8)}
    rec["random_v4"] = {f"q{n}": evaluate(random_mimi, utts, n, proxies=True) for n in (4, 8)}
    rec = provenance.finished(rec, start)
    print(json.dumps(rec, indent=1))
    if args.figures and not args.eval_only:
        Path(args.figures).write_text(json.dumps(rec, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

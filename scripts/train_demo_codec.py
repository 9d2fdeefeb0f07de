"""Trains the demo's reduced Mimi (moshi's MimiModel with `tiny_mimi_config()`) as a speech autoencoder.

Data: espeak-ng sentences (`testing.speech.sentences`) in 12 voices with random rates and pitches, joined
with random pauses, random gain and a little white noise; random 0.96 s crops. Loss: multi-resolution STFT
(log-magnitude L1 + spectral convergence) + waveform L1 + moshi's RVQ commitment penalty; moshi's own
quantizer (EMA codebooks, dead-code replacement), 4 codebooks (the demo's) on 3 steps in 4, all 8 else.
Deterministic given --seed and --threads. Evaluates on held-out sentences in held-out voices (mel
correlation, SI-SNR, see `testing.audio_match`) and writes the weights and the figures (JSON).

    python scripts/train_demo_codec.py                      # the shipped weights (≈ 20 min on 2 cores)
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
sys.path.insert(0, str(ROOT))

from moshi.models import loaders  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from moshi_ttt.models import demo  # noqa: E402
from moshi_ttt.testing import audio_match, speech  # noqa: E402

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


def mrstft(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Multi-resolution STFT loss of `y` against `x` ([B, n]): log-magnitude L1 + spectral convergence."""
    loss = x.new_zeros(())
    for n in FFTS:
        w = torch.hann_window(n)
        sx = torch.stft(x, n, n // 4, window=w, return_complex=True).abs()
        sy = torch.stft(y, n, n // 4, window=w, return_complex=True).abs()
        loss = loss + (torch.log(sx + 1e-5) - torch.log(sy + 1e-5)).abs().mean()
        loss = loss + torch.linalg.norm(sx - sy) / torch.linalg.norm(sx).clamp_min(1e-5)
    return loss / len(FFTS)


@torch.no_grad()
def evaluate(mimi, utterances: list[np.ndarray], n_q: int) -> dict:
    """Mean held-out mel correlation and SI-SNR of encode → decode with `n_q` codebooks."""
    mimi.eval()
    mimi.set_num_codebooks(n_q)
    mels, snrs = [], []
    for pcm in utterances:
        n = math.ceil(len(pcm) / 1920) * 1920
        x = torch.nn.functional.pad(torch.from_numpy(pcm), (0, n - len(pcm)))[None, None]
        y = mimi.decode(mimi.encode(x))[0, 0, : len(pcm)]
        mels.append(audio_match.mel_correlation(pcm, y))
        snrs.append(audio_match.si_snr(pcm, y))
    return {"n_q": n_q, "mel_correlation": float(np.mean(mels)), "mel_correlation_min": float(np.min(mels)),
            "si_snr_db": float(np.mean(snrs)), "utterances": len(utterances)}


def random_codec():
    """Today's (DEMO_VERSION 4) demo codec: random weights, codebooks fitted on synthetic audio."""
    mimi = loaders.get_mimi(None, mimi_config=demo.tiny_mimi_config())
    mimi.load_state_dict(demo.random_mimi_state(0))
    return mimi


def train(args) -> dict:
    torch.manual_seed(args.seed)
    mimi = loaders.get_mimi(None, mimi_config=demo.tiny_mimi_config())
    mimi.train()
    stream = training_stream(args.seed, args.sentences)
    print(f"training audio: {len(stream) / SR / 60:.1f} min", file=sys.stderr)
    opt = torch.optim.AdamW(mimi.parameters(), lr=args.lr, betas=(0.8, 0.99), weight_decay=0.0)
    warm = min(100, args.steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))))
    gen = torch.Generator().manual_seed(args.seed + 1)
    t0 = time.perf_counter()
    bar = tqdm(range(args.steps), desc="codec", file=sys.stderr, mininterval=5)
    done = 0
    for step in bar:
        if args.minutes and time.perf_counter() - t0 > 60 * args.minutes:
            break
        starts = torch.randint(0, len(stream) - CROP, (args.batch,), generator=gen)
        x = torch.stack([stream[s:s + CROP] for s in starts.tolist()])[:, None]
        mimi.set_num_codebooks(4 if torch.rand((), generator=gen) < 0.75 else 8)
        res = mimi(x)
        y = res.x
        spec = mrstft(x[:, 0], y[:, 0])
        wave = (x - y).abs().mean()
        loss = spec + wave + res.penalty
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(mimi.parameters(), 1.0)
        opt.step()
        sched.step()
        done = step + 1
        if step % 25 == 0:
            bar.set_postfix(stft=f"{spec.item():.3f}", l1=f"{wave.item():.4f}", commit=f"{res.penalty.item():.4f}")
    wall = time.perf_counter() - t0
    return {"mimi": mimi, "steps": done, "wall_s": wall, "s_per_step": wall / max(done, 1),
            "final_stft_loss": float(spec), "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=900, help="optimizer steps (default 900: the shipped weights)")
    p.add_argument("--minutes", type=float, default=0, help="stop early after this many minutes (0: never)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--sentences", type=int, default=400, help="training sentences")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: bit-reproducible; others within noise)")
    p.add_argument("--out", default=str(demo.DEMO_ASSETS / "mimi.safetensors"))
    p.add_argument("--figures", default=str(ROOT / "docs" / "demo_codec.json"))
    p.add_argument("--eval-only", metavar="WEIGHTS", help="only evaluate these weights (and the random codec)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    utts = held_out(args.seed)
    rec: dict = {"seed": args.seed}
    if args.eval_only:
        mimi = loaders.get_mimi(None, mimi_config=demo.tiny_mimi_config())
        mimi.load_state_dict(demo.float_state(load_file(args.eval_only)))
    else:
        run = train(args)
        mimi = run.pop("mimi")
        rec.update(run, batch=args.batch, lr=args.lr, sentences=args.sentences, requested_steps=args.steps)
        state = demo.half_state(mimi.state_dict())
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save_file(state, args.out)
        mimi.load_state_dict(demo.float_state(state))  # evaluate exactly what ships
        print(f"wrote {args.out}", file=sys.stderr)
    random_mimi = random_codec()
    rec["trained"] = {f"q{n}": evaluate(mimi, utts, n) for n in (4, 8)}
    rec["random_v4"] = {f"q{n}": evaluate(random_mimi, utts, n) for n in (4, 8)}
    print(json.dumps(rec, indent=1))
    if args.figures and not args.eval_only:
        Path(args.figures).write_text(json.dumps(rec, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

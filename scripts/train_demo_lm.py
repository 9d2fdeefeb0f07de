"""Trains the demo LM (configs/tiny.yaml + DEMO_LM_OVERRIDES, TTT of configs/demo_ttt.yaml) as an echo:
Moshi's audio stream repeats the user's audio stream `ECHO_FRAMES` frames (0.96 s) later, its text
stream is padding.

Data: espeak-ng speech (training voices, other sentences than the codec's) encoded by the shipped demo
codec (4 codebooks), random 32-frame windows (2 TTT chunks), then (`--long-from`) 96-frame windows, longer
than the 64-frame attention context: trained on short windows only, the copy held for ≈ 30 frames and then
fell apart. User = the window, Moshi = the codec's silence code for the first ECHO_FRAMES frames, then the
window delayed. Loss: the
project's training loss (`moshi_ttt.train.loss`, text CE + audio CE). Deterministic given --seed and
--threads. Evaluates `moshi-ttt infer` of the trained checkpoint on held-out speech (held-out voices,
sentences) and writes the weights (float16 safetensors) and the figures (JSON).

    python scripts/train_demo_lm.py                                # the shipped weights
    python scripts/train_demo_lm.py --steps 20 --out /tmp/lm.safetensors --figures /tmp/f.json   # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
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
from moshi_ttt.models.lm import build_ttt_lm  # noqa: E402
from moshi_ttt.testing import speech  # noqa: E402
from moshi_ttt.train.loss import global_loss, loss_parts  # noqa: E402
from moshi_ttt.ttt.config import load_lm_and_ttt, load_ttt_config  # noqa: E402
from moshi_ttt.utils import provenance  # noqa: E402

from support import audio_match  # noqa: E402

SR = 24000
FRAME = 1920


def data_seed(args) -> int:
    """The training sentences' seed: other sentences than the codec's (seed + 7)."""
    return args.seed + 7


def load_codec(path: Path):
    mimi = loaders.get_mimi(None, mimi_config=demo.tiny_mimi_config())
    mimi.load_state_dict(demo.float_state(load_file(str(path))))
    mimi.set_num_codebooks(4)
    return mimi.eval()


@torch.no_grad()
def encode_stream(mimi, seed: int, n_sentences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [4, F] of the training speech with 0–1 s pauses, the silence code [4])."""
    rng = random.Random(seed)
    texts = speech.sentences(n_sentences, seed)
    parts = []
    for pcm in speech.varied_speech(texts, speech.TRAIN_VOICES, seed):
        parts += [np.zeros(int(rng.uniform(0.0, 1.0) * SR), np.float32), rng.uniform(0.3, 1.0) * pcm]
    x = np.concatenate(parts)
    x = np.pad(x, (0, -len(x) % FRAME))
    codes = torch.cat([mimi.encode(torch.from_numpy(x[i:i + 200 * FRAME])[None, None])[0]
                       for i in range(0, len(x), 200 * FRAME)], dim=-1)
    silence = mimi.encode(torch.zeros(1, 1, 8 * FRAME))[0, :, -1]
    return codes, silence


def batch(codes: torch.Tensor, silence: torch.Tensor, gen: torch.Generator, b: int, pad_id: int,
          window: int) -> torch.Tensor:
    """[b, 9, window]: text = pad, Moshi = silence then user delayed by ECHO_FRAMES, user = a random window."""
    starts = torch.randint(0, codes.shape[-1] - window, (b,), generator=gen).tolist()
    user = torch.stack([codes[:, s:s + window] for s in starts])
    moshi = torch.cat([silence[None, :, None].expand(b, -1, demo.ECHO_FRAMES), user[..., :-demo.ECHO_FRAMES]], -1)
    text = torch.full((b, 1, window), pad_id, dtype=user.dtype)
    return torch.cat([text, moshi, user], dim=1)


def train(args, codes, silence) -> dict:
    lm_kwargs, _ = load_lm_and_ttt("tiny")
    lm_kwargs.update(demo.DEMO_LM_OVERRIDES)
    torch.manual_seed(args.seed)
    model = build_ttt_lm(lm_kwargs, load_ttt_config(demo.DEMO_TTT_CONFIG)).train()
    pad = model.text_padding_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warm = min(200, args.steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))))
    gen = torch.Generator().manual_seed(args.seed + 1)
    t0 = time.perf_counter()
    done = 0
    bar = tqdm(range(args.steps), desc="echo lm", file=sys.stderr, mininterval=5)
    for step in bar:
        if args.minutes and time.perf_counter() - t0 > 60 * args.minutes:
            break
        long = step >= args.long_from
        x = batch(codes, silence, gen, args.long_batch if long else args.batch, pad, args.long_window if long else 32)
        out = model(x)
        parts = loss_parts(out, x, model.audio_offset, model.dep_q, {pad, model.end_of_text_padding_id}, 1.0, 1.0)
        loss, text, audio = global_loss(parts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        done = step + 1
        if step % 25 == 0:
            bar.set_postfix(audio=f"{audio.item():.3f}", text=f"{text.item():.4f}")
    wall = time.perf_counter() - t0
    return {"model": model.eval(), "steps": done, "wall_s": wall, "s_per_step": wall / max(done, 1),
            "final_audio_loss": float(audio), "final_text_loss": float(text), "threads": torch.get_num_threads()}


def evaluate(lm_path: Path, codec_path: Path, seed: int, train_texts: set[str], n: int = 4) -> dict:
    """`moshi-ttt infer` of a demo checkpoint with these weights on `n` held-out utterances: the output's
    mel correlation with the input `ECHO_OUTPUT_FRAMES` later (the delay heard), and with an unrelated
    held-out utterance."""
    import sphn

    from moshi_ttt.apps import commands

    texts = [s for s in speech.sentences(len(train_texts) + 8 * n, seed + 2000) if s not in train_texts][: n + 1]
    pcms = speech.varied_speech(texts, speech.HELD_OUT_VOICES, seed + 2000)
    delay = demo.ECHO_OUTPUT_FRAMES * FRAME
    rows = []
    with tempfile.TemporaryDirectory() as d:
        repo = demo.make_local_repo(Path(d) / "repo", ttt=load_ttt_config(demo.DEMO_TTT_CONFIG),
                                    lm_overrides=demo.DEMO_LM_OVERRIDES, demo_weights=(codec_path, lm_path))
        for i in range(n):
            pcm = np.concatenate([pcms[i], np.zeros(delay + FRAME, np.float32)])
            sphn.write_wav(str(Path(d) / "in.wav"), pcm, sample_rate=SR)
            rc = commands.main(["infer", str(Path(d) / "in.wav"), str(Path(d) / "out.wav"), "--hf-repo", str(repo)])
            if rc:
                raise RuntimeError(f"infer failed with exit code {rc}")
            out, _ = sphn.read(str(Path(d) / "out.wav"), sample_rate=SR)
            rows.append({"echo": audio_match.delayed_mel_correlation(out[0], pcms[i], delay),
                         "unrelated": audio_match.delayed_mel_correlation(out[0], pcms[i + 1], delay),
                         "no_delay": audio_match.mel_correlation(out[0], pcms[i])})
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} | {
        "echo_min": float(min(r["echo"] for r in rows)), "utterances": n}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4500, help="optimizer steps (default: the shipped weights)")
    p.add_argument("--minutes", type=float, default=0, help="stop early after this many minutes (0: never)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--long-from", type=int, default=3000,
                   help="from this step on, --long-batch windows of --long-window frames instead of --batch × 32")
    p.add_argument("--long-window", type=int, default=96, help="longer than the 64-frame attention context")
    p.add_argument("--long-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--sentences", type=int, default=5000, help="training sentences")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: bit-reproducible; others within noise)")
    p.add_argument("--codec", default=str(demo.DEMO_ASSETS / "mimi.safetensors"))
    p.add_argument("--out", default=str(demo.DEMO_ASSETS / "echo_lm.safetensors"))
    p.add_argument("--figures", default=str(ROOT / "docs" / "demo_lm.json"))
    p.add_argument("--eval-only", action="store_true", help="only evaluate --out")
    args = p.parse_args(argv)
    start = provenance.started()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # speed only (docs/demo.md)
    rec: dict = {"seed": args.seed, "echo_frames": demo.ECHO_FRAMES, "echo_output_frames": demo.ECHO_OUTPUT_FRAMES}
    if not args.eval_only:
        codes, silence = encode_stream(load_codec(Path(args.codec)), data_seed(args), args.sentences)
        print(f"training codes: {codes.shape[-1]} frames ({codes.shape[-1] / 12.5 / 60:.1f} min)", file=sys.stderr)
        run = train(args, codes, silence)
        model = run.pop("model")
        rec.update(run, batch=args.batch, lr=args.lr, sentences=args.sentences, requested_steps=args.steps,
                   long_from=args.long_from, long_window=args.long_window, long_batch=args.long_batch)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save_file(demo.half_state(model.state_dict()), args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    train_texts = set(speech.sentences(args.sentences, data_seed(args)))
    rec["held_out_infer"] = evaluate(Path(args.out), Path(args.codec), args.seed, train_texts)
    rec = provenance.finished(rec, start)
    print(json.dumps(rec, indent=1))
    if args.figures and not args.eval_only:
        Path(args.figures).write_text(json.dumps(rec, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

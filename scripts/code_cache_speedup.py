"""Measures what the training code cache (moshi_ttt/train/code_cache.py) saves: the time to get the codes of a
dataset by encoding it with the codec (every run without the cache; moshi-finetune re-encodes every epoch) and
by reading them back from the cache (every later run), for the demo codec and for a full-size Mimi (Moshi 7B's
architecture; random weights: the time does not depend on them). Also one training step of the demo-sized
model on the same batch, to say whether encoding would be a bottleneck. Writes docs/code_cache.json.

    python scripts/code_cache_speedup.py [--recordings 8 --seconds 60 --threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moshi.models import loaders  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from moshi_ttt import runtime  # noqa: E402
from moshi_ttt.testing import speech  # noqa: E402
from moshi_ttt.train.code_cache import CodeCache  # noqa: E402
from moshi_ttt.train.data import Dataset, TokenIds  # noqa: E402
from moshi_ttt.utils import provenance  # noqa: E402

SR = 24000


def make_dataset(folder: Path, n: int, seconds: float, seed: int) -> Path:
    """n stereo recordings of `seconds`: espeak-ng sentences on both channels, words aligned to the left."""
    rng = np.random.default_rng(seed)
    texts = speech.sentences(40, seed)
    pcms = speech.varied_speech(texts, speech.TRAIN_VOICES, seed)
    lines = []
    for i in range(n):
        chans = [np.zeros(int(seconds * SR), np.float32) for _ in range(2)]
        words = []
        for ch in range(2):
            t = float(rng.uniform(0, 1))
            while True:
                j = int(rng.integers(len(pcms)))
                a, pcm = int(t * SR), pcms[j]
                if a + len(pcm) > len(chans[ch]):
                    break
                chans[ch][a:a + len(pcm)] += pcm
                if ch == 0:
                    step = len(pcm) / SR / len(texts[j].split())
                    words += [[w, [t + k * step, t + (k + 1) * step], "SPEAKER_MAIN"]
                              for k, w in enumerate(texts[j].split())]
                t += len(pcm) / SR + float(rng.uniform(0.3, 1.0))
        wav = folder / f"r{i}.wav"
        speech.write_wav(wav, chans)
        wav.with_suffix(".json").write_text(json.dumps({"alignments": words}))
        lines.append(json.dumps({"path": wav.name, "duration": seconds}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl"


def timed_codes(manifest: Path, mimi, tokenizer, ids: TokenIds, cache: CodeCache | None) -> tuple[float, torch.Tensor]:
    t = time.perf_counter()
    ds = Dataset(manifest, 640, 17, "SPEAKER_MAIN", code_cache=cache)
    codes = ds.batch(range(len(ds)), mimi, tokenizer, ids)
    return time.perf_counter() - t, codes


def measure(name: str, manifest: Path, mimi, mimi_file: Path, mimi_config, tokenizer, tok_file, ids, root: Path,
            audio_s: float) -> dict:
    codec = CodeCache.codec_id_of(mimi_file, mimi_config, mimi.num_codebooks, tok_file, ids, 12.5)
    encode_s, plain = timed_codes(manifest, mimi, tokenizer, ids, None)
    cold = CodeCache(root / name, codec)
    cold_s, codes = timed_codes(manifest, mimi, tokenizer, ids, cold)
    warm = CodeCache(root / name, codec)
    warm_s, again = timed_codes(manifest, mimi, tokenizer, ids, warm)
    assert torch.equal(plain, codes) and torch.equal(plain, again) and warm.misses == 0
    row = {"codec": name, "audio_seconds": audio_s, "encode_s": encode_s, "first_run_with_cache_s": cold_s,
           "cached_s": warm_s, "speedup": encode_s / warm_s, "encode_x_realtime": audio_s / encode_s}
    print(f"{name}: encode {encode_s:.2f} s ({audio_s / encode_s:.0f}× real time), first run with the cache "
          f"{cold_s:.2f} s, cached {warm_s:.3f} s: {encode_s / warm_s:.0f}× faster", file=sys.stderr)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recordings", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "docs" / "code_cache.json"))
    args = p.parse_args()
    start = provenance.started()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "data").mkdir()
        manifest = make_dataset(d / "data", args.recordings, args.seconds, args.seed)
        audio_s = args.recordings * args.seconds
        pieces = runtime.load(runtime.CheckpointFlags(demo=True), torch.device("cpu"), torch.float32)
        info, ids = pieces.info, TokenIds.of(pieces.lm)
        rows.append(measure("demo codec (4 codebooks)", manifest, pieces.mimi, Path(info.mimi_weights),
                            info.mimi_config, pieces.tokenizer, info.tokenizer, ids, d / "cache", audio_s))
        # one training step of the demo-sized model (fwd + bwd, batch 8 × 640 frames), to compare
        lm = pieces.lm.train()
        ds = Dataset(manifest, 640, 17, "SPEAKER_MAIN")
        batch = ds.batch(list(range(min(8, len(ds)))), pieces.mimi, pieces.tokenizer, ids)
        t = time.perf_counter()
        out = lm(batch)
        (out.text_logits.float().mean() + out.logits.float().mean()).backward()
        step_s = time.perf_counter() - t
        full = loaders.get_mimi(None, device="cpu")
        full.set_num_codebooks(8)
        save_file(full.state_dict(), str(d / "mimi_full.safetensors"))
        ids16 = TokenIds(ids.text_padding, ids.end_of_text_padding, ids.zero, ids.text_card, 16)
        rows.append(measure("full-size Mimi (8 codebooks)", manifest, full, d / "mimi_full.safetensors", None,
                            pieces.tokenizer, info.tokenizer, ids16, d / "cache", audio_s))
    report = {"recordings": args.recordings, "seconds_each": args.seconds, "threads": args.threads, "seed": args.seed,
              "torch": torch.__version__, "rows": rows,
              "demo_train_step_s": {"batch": int(batch.shape[0]), "frames": int(batch.shape[-1]), "seconds": step_s}}
    Path(args.out).write_text(json.dumps(provenance.finished(report, start), indent=1) + "\n")
    print(f"demo-sized train step (fwd+bwd, {batch.shape[0]} × {batch.shape[-1]} frames): {step_s:.2f} s; "
          f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

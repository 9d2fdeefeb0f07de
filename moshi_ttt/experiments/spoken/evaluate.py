"""A spoken-memory set through `moshi-ttt infer` (streaming LMGen with TTT, as the server runs it), then scored.

Per conversation `conv_NNNNN` of the manifest: the user's channel alone (right; the left one holds the answers)
is written as a mono WAV, `moshi-ttt infer` runs on it with the caller's checkpoint flags, and its outputs go to
`RESULTS/conv_NNNNN.{wav,txt,text.json,ttt.json}`. A conversation whose timed text exists is not run again
(a run is resumable; delete RESULTS to redo it). The summary (`score.score_set`) goes to RESULTS/summary.json.

    python -m moshi_ttt.experiments.spoken.evaluate --manifest data/eval.jsonl --results R --window-s 9.6 \\
        -- --hf-repo RUN/export --temp-text 0
"""

from __future__ import annotations

import argparse
import json
import sys
import typing as tp
from pathlib import Path

import numpy as np

from moshi_ttt.experiments.spoken.score import score_set
from moshi_ttt.experiments.spoken.spec import MAX_LATENCY_S


class EvaluationError(RuntimeError):
    """`moshi-ttt infer` failed on a conversation."""


def user_channel(wav: Path, out: Path) -> Path:
    """Writes the right (user) channel of the stereo `wav` to the mono WAV `out`."""
    import sphn

    from moshi_ttt.models.streams import SAMPLE_RATE

    pcm, _ = sphn.read(str(wav), sample_rate=SAMPLE_RATE)
    if pcm.ndim != 2 or pcm.shape[0] != 2:
        raise ValueError(f"{wav}: expected a stereo conversation (left = Moshi, right = the user), got shape "
                         f"{pcm.shape}")
    sphn.write_wav(str(out), np.ascontiguousarray(pcm[1], dtype=np.float32), sample_rate=SAMPLE_RATE)
    return out


def run_infer(wav: Path, results: Path, infer_args: tp.Sequence[str]) -> Path:
    """`moshi-ttt infer` (`python -m moshi_ttt infer`, a process of its own) on the user channel of `wav`;
    returns the timed text path."""
    import subprocess

    stem = wav.stem
    user = user_channel(wav, results / f"{stem}.user.wav")
    cmd = [sys.executable, "-m", "moshi_ttt", "infer", str(user), str(results / f"{stem}.wav"), *infer_args]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        raise EvaluationError(f"moshi-ttt infer failed on {wav} (exit code {proc.returncode}): "
                              f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")
    user.unlink()
    return results / f"{stem}.text.json"


def evaluate_set(manifest: str | Path, results: str | Path, infer_args: tp.Sequence[str], window_s: float,
                 bins: tp.Sequence[float] | None = None, max_latency_s: float = MAX_LATENCY_S,
                 progress: bool = True) -> dict:
    """Runs (or reuses) `infer` on every conversation of `manifest`, scores them and writes RESULTS/summary.json."""
    from tqdm import tqdm

    from moshi_ttt.train.data import read_manifest

    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    pairs = []
    wavs = [wav for wav, _, _ in read_manifest(manifest)]
    for wav in tqdm(wavs, desc="spoken-memory eval", unit="conversation", file=sys.stderr, disable=not progress):
        timed = results / f"{wav.stem}.text.json"
        if not timed.exists():
            timed = run_infer(wav, results, infer_args)
        pairs.append((wav.with_suffix(".json"), timed))
    summary = score_set(pairs, window_s, bins, max_latency_s)
    summary = {"manifest": str(manifest), "infer_args": list(infer_args), **summary}
    (results / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    infer_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, infer_args = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m moshi_ttt.experiments.spoken.evaluate",
                                description="Run `moshi-ttt infer` on a spoken-memory set and score its recall "
                                            "(docs/spoken-memory.md). Infer's flags go after `--`.")
    p.add_argument("--manifest", required=True, help="the set's SPLIT.jsonl")
    p.add_argument("--results", required=True, help="output folder (reused: finished conversations are kept)")
    p.add_argument("--window-s", type=float, required=True, help="the model's attention window in seconds")
    p.add_argument("--bins", type=float, nargs="+", default=None, help="distance bin edges, s")
    p.add_argument("--max-latency-s", type=float, default=MAX_LATENCY_S)
    a = p.parse_args(argv)
    try:
        summary = evaluate_set(a.manifest, a.results, infer_args, a.window_s, a.bins, a.max_latency_s)
    except (ValueError, EvaluationError) as e:
        p.error(str(e))
    sys.stdout.write(json.dumps({k: v for k, v in summary.items() if k != "questions"}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

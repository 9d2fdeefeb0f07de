"""A spoken-memory set through `moshi-ttt infer` (streaming LMGen with TTT, as the server runs it), then scored.

Per conversation `conv_NNNNN` of the manifest: the user's channel alone (right; the left one holds the answers)
is written as a mono WAV into an input folder, and `moshi-ttt infer` runs on that folder with the caller's flags:
the conversations step together in batches (each with its own KV cache and fast weights, as the server runs
them); its outputs go to `RESULTS/conv_NNNNN.{wav,txt,text.json}` (+ `batch_K.ttt.json`). A conversation whose
timed text exists is not run again (resumable; delete RESULTS to redo it). The summary (`score.score_set`) goes
to RESULTS/summary.json.

    python -m moshi_ttt.experiments.spoken.evaluate --manifest data/eval.jsonl --results R --window-s 9.6 \\
        -- --hf-repo RUN/export --temp-text 0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
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


def run_infer(wavs: tp.Sequence[Path], results: Path, infer_args: tp.Sequence[str]) -> None:
    """`moshi-ttt infer` (`python -m moshi_ttt infer`, a process of its own) on an input folder holding the user
    channels of `wavs`: one batch of conversations (as the server steps them), outputs in `results`."""
    import shutil

    inputs = results / "input"
    shutil.rmtree(inputs, ignore_errors=True)
    inputs.mkdir(parents=True)
    for wav in wavs:
        user_channel(wav, inputs / f"{wav.stem}.wav")
    infer_folder(inputs, results, infer_args)
    shutil.rmtree(inputs)


def infer_folder(inputs: Path, results: Path, infer_args: tp.Sequence[str]) -> None:
    """`moshi-ttt infer INPUTS RESULTS *infer_args` in a process of its own; EvaluationError if it fails."""
    import subprocess

    cmd = [sys.executable, "-m", "moshi_ttt", "infer", str(inputs), str(results), *infer_args]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        raise EvaluationError(f"moshi-ttt infer failed on {inputs} (exit code {proc.returncode}): {last}")


def evaluate_set(manifest: str | Path, results: str | Path, infer_args: tp.Sequence[str], window_s: float,
                 bins: tp.Sequence[float] | None = None, max_latency_s: float = MAX_LATENCY_S) -> dict:
    """Runs `infer` on the conversations of `manifest` without a timed text in RESULTS yet (all in one input
    folder: `--batch-size` in `infer_args` sets how many step together), scores them all and writes
    RESULTS/summary.json."""
    from moshi_ttt.train.data import read_manifest

    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    wavs = [wav for wav, _, _ in read_manifest(manifest)]
    todo = [w for w in wavs if not (results / f"{w.stem}.text.json").exists()]
    if todo:
        run_infer(todo, results, infer_args)
    pairs = [(w.with_suffix(".json"), results / f"{w.stem}.text.json") for w in wavs]
    summary = score_set(pairs, window_s, bins, max_latency_s)
    summary = {"manifest": str(manifest), "infer_args": list(infer_args), **summary}
    (results / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def as_served(pcm: np.ndarray) -> np.ndarray:
    """The mono 24 kHz `pcm` as `serve` hears it from `websocket_timed_text`: encoded to Ogg/Opus pages by the
    client (`ChatClient.send_pcm`'s frames) and decoded by the server's `sphn.OpusStreamReader`."""
    import sphn

    from moshi_ttt.models.streams import FRAME, SAMPLE_RATE

    pcm = np.asarray(pcm, np.float32).reshape(-1)
    pcm = np.concatenate([pcm, np.zeros(-pcm.size % FRAME, np.float32)])
    writer, reader = sphn.OpusStreamWriter(SAMPLE_RATE), sphn.OpusStreamReader(SAMPLE_RATE)
    out = []
    for i in range(0, pcm.size, FRAME):
        page = writer.append_pcm(pcm[i:i + FRAME])
        if len(page):
            out.append(reader.append_bytes(bytes(page)))
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def websocket_timed_text(url: str, pcm: np.ndarray, realtime: float = 1.0, tail_s: float = 1.0) -> dict:
    """Streams the mono 24 kHz `pcm` (then `tail_s` of silence) to a `moshi-ttt serve` at `url` over its websocket
    (`server.web.client.ChatClient`, paced at `realtime`) and returns Moshi's text as timed text (`score.timed_words`'
    form): each word of the 0x02 text pieces with its arrival time, in seconds after the first audio was sent (so
    the server's latency is included), and the server's 0x05 error messages (`errors`)."""
    import asyncio

    import aiohttp

    from moshi_ttt.server.web.client import ChatClient

    async def go() -> tuple[list[str], list[float], float]:
        async with aiohttp.ClientSession() as http:
            c = await ChatClient.connect(http, url.replace("http://", "ws://").rstrip("/") + "/api/chat")
            t0 = time.monotonic()
            silence = np.zeros(round(tail_s * 24000), np.float32)
            await c.send_pcm(np.concatenate([np.asarray(pcm, np.float32), silence]), realtime=realtime)
            await asyncio.sleep(0.5)
            await c.close()
            return list(c.text), list(c.text_times), t0, list(c.errors)

    from moshi_ttt.models.streams import words_of

    pieces, times, t0, errors = asyncio.run(go())
    words = words_of((p, {"time": t - t0}) for p, t in zip(pieces, times, strict=True))
    return {"words": words, "pieces": [[p, t - t0] for p, t in zip(pieces, times, strict=True)], "errors": errors}


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

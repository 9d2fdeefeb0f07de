"""Across conversations: each conversation of a spoken-memory set cut in two right after its last fact. Part A
(every fact, the questions asked before the cut) runs with `infer --save-memory`; part B (the questions still
due) runs as a new conversation, with a fresh KV cache, once resuming A's memory (`infer --memory`) and once
fresh (the control). Only B's questions are scored; their distances stay those of the whole conversation.

A cross set (`write_cross_set`): `<out>/a/conv_NNNNN.wav`, `<out>/b/conv_NNNNN.wav` (the user's channel, mono,
cut at a frame boundary) and `<out>/cross.json` (per conversation: its JSON, the cut in seconds). Results
(`evaluate_cross`): `RESULTS/a/`, `RESULTS/memories/`, `RESULTS/b_memory/`, `RESULTS/b_fresh/` (infer outputs)
and `RESULTS/summary.json` ({"memory": summary, "fresh": summary}, `score.score_set`'s form).
"""

from __future__ import annotations

import json
import math
import typing as tp
from pathlib import Path

import numpy as np

from moshi_ttt.experiments.spoken.score import questions_of, score_set
from moshi_ttt.experiments.spoken.spec import MAX_LATENCY_S, Question
from moshi_ttt.utils.io import atomic_write

CUT_AFTER_S = 0.05  # the cut: this long after the last fact's end, rounded up to a frame boundary


def cut_time(record: tp.Mapping, frame_rate: float) -> float:
    """Seconds into the conversation where B starts: a whole frame, after the last fact and before whatever the
    user says next (pauses are >= 0.3 s)."""
    last = max(u["end"] for u in record["utterances"] if u["kind"] == "fact")
    return math.ceil((last + CUT_AFTER_S) * frame_rate) / frame_rate


def write_cross_set(manifest: str | Path, out: str | Path) -> Path:
    """The cross set of the conversations of `manifest` (module doc); returns `<out>/cross.json`. Conversations
    with no question after the cut are left out."""
    import sphn

    from moshi_ttt.models.streams import FRAME_RATE, SAMPLE_RATE
    from moshi_ttt.train.data import read_manifest

    out = Path(out)
    for part in ("a", "b"):
        (out / part).mkdir(parents=True, exist_ok=True)
    rows = []
    for wav, _, _ in read_manifest(manifest):
        truth = wav.with_suffix(".json")
        record = json.loads(truth.read_text())["spoken_memory"]
        cut = cut_time(record, FRAME_RATE)
        if not any(q.q_start >= cut for q in questions_of(record)):
            continue
        pcm, _ = sphn.read(str(wav), sample_rate=SAMPLE_RATE)
        user = np.ascontiguousarray(pcm[1], dtype=np.float32)
        k = round(cut * SAMPLE_RATE)
        sphn.write_wav(str(out / "a" / wav.name), user[:k], sample_rate=SAMPLE_RATE)
        sphn.write_wav(str(out / "b" / wav.name), user[k:], sample_rate=SAMPLE_RATE)
        rows.append({"conversation": wav.stem, "truth": str(truth), "cut": cut})
    if not rows:
        raise ValueError(f"{manifest}: no conversation has a question after its last fact")
    return atomic_write(out / "cross.json", lambda p: p.write_text(json.dumps(rows, indent=1) + "\n"))


def b_questions(row: tp.Mapping) -> list[Question]:
    """The questions of B: those asked after the cut (in the whole conversation's time)."""
    return [q for q in questions_of(Path(row["truth"])) if q.q_start >= row["cut"]]


def shifted(timed_text: Path, cut: float) -> dict:
    """B's timed text in the whole conversation's time (every word `cut` seconds later)."""
    d = json.loads(timed_text.read_text())
    return {**d, "words": [{**w, "time": w["time"] + cut} for w in d["words"]]}


def evaluate_cross(cross: str | Path, results: str | Path, infer_args: tp.Sequence[str], window_s: float,
                   bins: tp.Sequence[float] | None = None, max_latency_s: float = MAX_LATENCY_S) -> dict:
    """A with --save-memory, B with --memory (A's) and B fresh, each an `infer` of a folder (batched as
    `infer_args` says); B's questions scored both ways. Each step is skipped if its outputs are there (resumable);
    returns and writes RESULTS/summary.json."""
    from moshi_ttt.experiments.spoken.evaluate import infer_folder

    cross, results = Path(cross), Path(results)
    rows = json.loads((cross / "cross.json").read_text())
    mems = results / "memories"
    runs = (("a", results / "a", ["--save-memory", str(mems)]),  # infer saves the memories before the texts
            ("b", results / "b_memory", ["--memory", str(mems)]),
            ("b", results / "b_fresh", []))
    for part, dst, extra in runs:
        if not all((dst / f"{r['conversation']}.text.json").exists() for r in rows):
            infer_folder(cross / part, dst, [*infer_args, *extra])
    summary = {}
    for name, dst in (("memory", results / "b_memory"), ("fresh", results / "b_fresh")):
        pairs = [(b_questions(r), shifted(dst / f"{r['conversation']}.text.json", r["cut"])) for r in rows]
        summary[name] = score_set(pairs, window_s, bins, max_latency_s)
    summary = {"cross": str(cross), "infer_args": list(infer_args), **summary}
    (results / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary

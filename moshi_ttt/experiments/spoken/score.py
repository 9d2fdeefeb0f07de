"""The spoken-memory recall scorer: Moshi's timed text (from `moshi-ttt infer`) against a conversation's questions.

Timed text: `{"frame_rate": 12.5, "words": [{"word": "seven", "frame": 130, "time": 10.4}, ...]}`, time =
frame / frame_rate (the start of the frame). Per question, the first word (normalised, non-empty) with
time >= q_end decides: "right" if it is the answer and time <= q_end + max_latency_s, "late" if it comes
after that (whatever it says), "wrong" if it is another word in time, "missing" if there is none.
Recall = share of "right". Bins: edges e_0 < ... < e_m give [e_i, e_i+1) and a last bin [e_m, inf);
inside the attention window: distance < window_s, beyond: distance >= window_s.

    python -m moshi_ttt.experiments.spoken.score --manifest eval.jsonl --results DIR --window-s 9.6
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import typing as tp
from pathlib import Path

from moshi_ttt.experiments.spoken.spec import CHANCE, MAX_LATENCY_S, NUMBERS, Question

OUTCOMES = ("right", "wrong", "late", "missing")
_DIGITS = {str(i + 1): w for i, w in enumerate(NUMBERS)}


@dataclasses.dataclass(frozen=True)
class Result:
    """One question's outcome; `word` / `time`: the first word after the question (None if missing)."""

    colour: str
    answer: str
    distance: float
    q_end: float
    outcome: str
    word: str | None
    time: float | None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def normalise_word(word: str) -> str:
    """Lowercase, without SentencePiece's "▁", punctuation or spaces; a digit 1-9 becomes its number word."""
    w = re.sub(r"[\W_]+", "", word.replace("▁", "").lower())
    return _DIGITS.get(w, w)


def _load(src: str | Path | tp.Mapping, what: str) -> tuple[tp.Mapping, str]:
    if isinstance(src, tp.Mapping):
        return src, what
    path = Path(src)
    try:
        return json.loads(path.read_text()), str(path)
    except FileNotFoundError:
        raise ValueError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid JSON {what} ({e})") from None


def timed_words(timed_text: str | Path | tp.Mapping) -> list[tuple[str, float]]:
    """(normalised word, time) of a timed-text JSON (path or dict), sorted by time, empty words dropped."""
    d, where = _load(timed_text, "timed text")
    words = d.get("words") if isinstance(d, tp.Mapping) else None
    if not isinstance(words, list):
        raise ValueError(f"{where}: timed text needs a \"words\" list, got keys {sorted(d)[:8]}")
    out = []
    for i, w in enumerate(words):
        t = w.get("time") if isinstance(w, tp.Mapping) else None
        if not (isinstance(w, tp.Mapping) and isinstance(w.get("word"), str) and isinstance(t, (int, float))
                and not isinstance(t, bool) and math.isfinite(t)):
            raise ValueError(f"{where}: words[{i}] = {w!r}; expected {{\"word\": str, \"time\": seconds, ...}}")
        if normalise_word(w["word"]):
            out.append((normalise_word(w["word"]), float(t)))
    return sorted(out, key=lambda x: x[1])


def questions_of(truth: str | Path | tp.Mapping | tp.Sequence[Question]) -> list[Question]:
    """The questions of a conversation: its JSON (path or dict, with "spoken_memory"), the "spoken_memory"
    dict itself, or Question objects."""
    if isinstance(truth, (list, tuple)) and all(isinstance(q, Question) for q in truth):
        return list(truth)
    d, where = _load(truth, "conversation JSON")
    d = d.get("spoken_memory", d)
    if not isinstance(d, tp.Mapping) or not isinstance(d.get("questions"), list):
        raise ValueError(f"{where}: no spoken_memory questions (expected a conversation JSON of the generator)")
    return [Question.from_dict(q) for q in d["questions"]]


def score_question(q: Question, words: tp.Sequence[tuple[str, float]], max_latency_s: float = MAX_LATENCY_S
                   ) -> Result:
    """The outcome of question `q` given Moshi's (normalised word, time) list, sorted by time."""
    after = next(((w, t) for w, t in words if t >= q.q_end), None)
    if after is None:
        return Result(q.colour, q.answer, q.distance, q.q_end, "missing", None, None)
    w, t = after
    outcome = "late" if t > q.q_end + max_latency_s else "right" if w == q.answer else "wrong"
    return Result(q.colour, q.answer, q.distance, q.q_end, outcome, w, t)


def score_conversation(truth: str | Path | tp.Mapping | tp.Sequence[Question],
                       timed_text: str | Path | tp.Mapping, max_latency_s: float = MAX_LATENCY_S) -> list[Result]:
    """One Result per question of `truth` (see `questions_of`), in the order asked."""
    words = timed_words(timed_text)
    return [score_question(q, words, max_latency_s) for q in questions_of(truth)]


def default_bins(window_s: float, max_distance_s: float) -> list[float]:
    """Edges 0, w, 2w, ... up to the last multiple of the window <= max_distance_s."""
    return [k * window_s for k in range(int(max_distance_s // window_s) + 1)]


def _group(results: tp.Sequence[Result]) -> dict:
    counts = {o: sum(r.outcome == o for r in results) for o in OUTCOMES}
    return {"n": len(results), "recall": counts["right"] / len(results) if results else None, **counts}


def summarise(results: tp.Sequence[Result], window_s: float, bins: tp.Sequence[float] | None = None,
              max_latency_s: float = MAX_LATENCY_S) -> dict:
    """Recall overall, inside / beyond the window and per distance bin, with counts (a JSON-ready dict)."""
    if not (isinstance(window_s, (int, float)) and math.isfinite(window_s) and window_s > 0):
        raise ValueError(f"window_s={window_s!r}: must be a number of seconds > 0")
    edges = list(bins) if bins is not None else default_bins(
        window_s, max((r.distance for r in results), default=window_s))
    if not edges or any(b <= a for a, b in zip(edges, edges[1:])) or edges[0] < 0:
        raise ValueError(f"bins={edges!r}: must be increasing edges >= 0")
    his = [*edges[1:], math.inf]
    return {"window_s": window_s, "max_latency_s": max_latency_s, "chance": CHANCE, **_group(results),
            "inside": _group([r for r in results if r.distance < window_s]),
            "beyond": _group([r for r in results if r.distance >= window_s]),
            "bins": [{"lo": lo, "hi": None if hi == math.inf else hi,
                      **_group([r for r in results if lo <= r.distance < hi])} for lo, hi in zip(edges, his)]}


def score_set(pairs: tp.Iterable[tuple[tp.Any, tp.Any]], window_s: float, bins: tp.Sequence[float] | None = None,
              max_latency_s: float = MAX_LATENCY_S) -> dict:
    """`summarise` over conversations given as (truth, timed text) pairs (see `score_conversation`), plus
    "conversations" and "questions" (each Result with its conversation's index)."""
    rows, results = [], []
    n = 0
    for i, (truth, timed) in enumerate(pairs):
        n += 1
        for r in score_conversation(truth, timed, max_latency_s):
            results.append(r)
            rows.append({"conversation": i, **r.to_dict()})
    return {**summarise(results, window_s, bins, max_latency_s), "conversations": n, "questions": rows}


def main(argv: list[str] | None = None) -> int:
    from moshi_ttt.train.data import DataError, read_manifest

    p = argparse.ArgumentParser(prog="python -m moshi_ttt.experiments.spoken.score",
                                description="Score Moshi's recall on a spoken-memory set (docs/spoken-memory.md).")
    p.add_argument("--manifest", required=True, help="the set's SPLIT.jsonl")
    p.add_argument("--results", required=True, help="folder of timed texts: conv_NNNNN.text.json per conversation")
    p.add_argument("--window-s", type=float, required=True, help="the model's attention window in seconds")
    p.add_argument("--bins", type=float, nargs="+", default=None, help="distance bin edges, s (default: "
                   "multiples of the window)")
    p.add_argument("--max-latency-s", type=float, default=MAX_LATENCY_S)
    p.add_argument("--out", help="write the summary JSON here, with each question's outcome (stdout: the summary)")
    a = p.parse_args(argv)
    try:
        pairs = [(wav.with_suffix(".json"), Path(a.results) / f"{wav.stem}.text.json")
                 for wav, _, _ in read_manifest(a.manifest)]
        summary = score_set(pairs, a.window_s, a.bins, a.max_latency_s)
    except (ValueError, DataError) as e:
        p.error(str(e))
    if a.out:
        Path(a.out).write_text(json.dumps(summary, indent=1) + "\n")
    sys.stdout.write(json.dumps({k: v for k, v in summary.items() if k != "questions"}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

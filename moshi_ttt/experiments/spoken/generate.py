"""The spoken-memory generator: conversations of the spec (spec.py) synthesised by espeak-ng, in moshi-finetune's
data format.

A set is `<out>/<split>.jsonl` (one `{"path": "<split>/conv_00000.wav", "duration": s}` a line),
`<out>/<split>/conv_NNNNN.wav` (stereo 16-bit 24 kHz: left = Moshi's answers, right = the user),
`<out>/<split>/conv_NNNNN.json` (`alignments`: Moshi's answer words as SPEAKER_MAIN; `spoken_memory`: the
ground truth, see `Conversation.record`) and `<out>/<split>.meta.json` (seed, spec, voices, filler partition).
Conversation i of a set is generated from its own seed (`conversation_seed`): files are byte-identical for
the same (seed, split, spec). Times are whole samples of the file, written in seconds.

    python -m moshi_ttt.experiments.spoken.generate --out data/spoken --split eval --n 100 --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from moshi_ttt.experiments.spoken.spec import (
    COLOURS,
    EVAL_VOICES,
    FILLER_PARTITION,
    MAIN_SPEAKER,
    MOSHI_VOICE,
    NUMBERS,
    SPLITS,
    TRAIN_VOICES,
    VOICES,
    ConversationSpec,
    Question,
    Utterance,
    fact_text,
    filler_sentences,
    question_text,
)
from moshi_ttt.testing.speech import SAMPLE_RATE, espeak_pcm, write_wav
from moshi_ttt.utils.io import atomic_write

PEAK = 0.5  # every utterance is peak-normalised to this
TRIM = 0.002  # leading/trailing samples below TRIM x peak (-54 dB) are espeak's silence
SLACK_S = 1.5  # a question is asked up to this early (about half a filler), so distances centre on the target
FORMAT = "spoken-memory/1"


@dataclasses.dataclass(frozen=True, eq=False)
class Conversation:
    """left / right: float32 [n] PCM at 24 kHz (Moshi, user); utterances in time order; questions in the
    order asked."""

    spec: ConversationSpec
    split: str
    seed: int
    user_voice: str
    user_rate_wpm: int
    user_pitch: int
    left: np.ndarray
    right: np.ndarray
    utterances: tuple[Utterance, ...]
    questions: tuple[Question, ...]
    plan: tuple[dict, ...]  # per fact: colour, number, target_fact_end, target_distance (s)

    @property
    def duration(self) -> float:
        return len(self.left) / SAMPLE_RATE

    def alignments(self) -> list:
        return [[u.text, [u.start, u.end], MAIN_SPEAKER] for u in self.utterances if u.kind == "answer"]

    def record(self) -> dict:
        """The `spoken_memory` ground truth of the conversation's JSON."""
        return {"format": FORMAT, "split": self.split, "seed": self.seed, "spec": self.spec.to_dict(),
                "user_voice": self.user_voice, "user_rate_wpm": self.user_rate_wpm, "user_pitch": self.user_pitch,
                "moshi_voice": MOSHI_VOICE, "duration": self.duration,
                "utterances": [u.to_dict() for u in self.utterances],
                "questions": [q.to_dict() for q in self.questions], "plan": list(self.plan)}


def speak(text: str, voice: str, rate_wpm: int | None = None, pitch: int | None = None) -> np.ndarray:
    """`text` by espeak-ng, its leading/trailing silence trimmed, peak-normalised: float32 [n] at 24 kHz."""
    pcm = espeak_pcm(text, voice, speed=rate_wpm, pitch=pitch)
    peak = float(np.abs(pcm).max())
    if peak <= 0:
        raise RuntimeError(f"espeak-ng gave silence for {text!r} (voice {voice})")
    loud = np.flatnonzero(np.abs(pcm) > TRIM * peak)
    return (pcm[loud[0]:loud[-1] + 1] * (PEAK / peak)).astype(np.float32)


def conversation_seed(seed: int, split: str, index: int) -> int:
    """The seed of conversation `index` of a set: a stable hash, distinct across splits."""
    return int.from_bytes(hashlib.sha256(f"spoken-memory:{split}:{seed}:{index}".encode()).digest()[:8], "big")


@dataclasses.dataclass
class _Fact:
    colour: str
    number: str
    target_end: float  # planned end of the fact (s)
    distance: float  # target fact->question distance (s)
    start: int = -1  # actual span (samples), once said
    end: int = -1


def _plan(spec: ConversationSpec, rng: random.Random) -> list[_Fact]:
    """Distinct colours, numbers, target distances U(min, min(max, duration - OVERHEAD)) and fact ends
    U(2 s, duration - 1.5 s - distance), sorted by planned end."""
    colours = rng.sample(COLOURS, spec.facts)
    top = min(spec.max_distance_s, spec.duration_s - spec.OVERHEAD_S)
    facts = []
    for colour in colours:
        d = rng.uniform(spec.min_distance_s, top)
        facts.append(_Fact(colour, rng.choice(NUMBERS), rng.uniform(2.0, max(2.0, spec.duration_s - 1.5 - d)), d))
    return sorted(facts, key=lambda f: f.target_end)


def generate_conversation(spec: ConversationSpec, seed: int, split: str) -> Conversation:
    """One conversation, deterministic in (spec, seed, split): a user voice of the split, its fillers.

    Walking forward: a due question is asked (then Moshi answers), else a due fact is said, else a filler;
    a pause of `spec.pause_s` before each user utterance, `spec.answer_delay_s` before each answer.
    Raises SpeechUnavailable without espeak-ng.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: must be one of {SPLITS}")
    rng = random.Random(seed)
    voice = rng.choice(VOICES[split])
    rate, pitch = rng.randint(*spec.rate_wpm), rng.randint(*spec.pitch)
    fillers = filler_sentences(split)
    facts = _plan(spec, rng)
    plan = tuple({"colour": f.colour, "number": f.number, "target_fact_end": round(f.target_end, 6),
                  "target_distance": round(f.distance, 6)} for f in facts)
    sr = SAMPLE_RATE
    user = {f.colour: (speak(fact_text(f.colour, f.number), voice, rate, pitch),
                       speak(question_text(f.colour), voice, rate, pitch)) for f in facts}
    right: list[tuple[int, np.ndarray]] = []
    left: list[tuple[int, np.ndarray]] = []
    utts: list[Utterance] = []
    questions: list[Question] = []
    pending = list(facts)
    said: list[_Fact] = []  # facts said, question not yet asked
    used: set[str] = set()
    t = 0  # end of the last utterance (samples)

    def sec(n: int) -> float:
        return round(n / sr, 6)

    def put(kind: str, text: str, pcm: np.ndarray, start: int, colour=None, number=None) -> int:
        (left if kind == "answer" else right).append((start, pcm))
        end = start + len(pcm)
        utts.append(Utterance(kind, "moshi" if kind == "answer" else "user", text, sec(start), sec(end),
                              colour, number))
        return end

    while True:
        start = t + round(rng.uniform(*spec.pause_s) * sr)
        ready = [f for f in said if (start + len(user[f.colour][1])) / sr
                 >= max(f.end / sr + f.distance - SLACK_S, f.end / sr + spec.min_distance_s)]
        if ready:
            f = min(ready, key=lambda f: f.end / sr + f.distance)
            said.remove(f)
            q_end = put("question", question_text(f.colour), user[f.colour][1], start, f.colour)
            a_start = q_end + round(rng.uniform(*spec.answer_delay_s) * sr)
            t = put("answer", f.number, speak(f.number, MOSHI_VOICE), a_start, f.colour, f.number)
            questions.append(Question(f.colour, f.number, sec(f.start), sec(f.end), sec(start), sec(q_end),
                                      sec(a_start), sec(t), round(sec(q_end) - sec(f.end), 6)))
            continue
        if pending and (start + len(user[pending[0].colour][0])) / sr >= pending[0].target_end - SLACK_S:
            f = pending.pop(0)
            f.start, f.end = start, put("fact", fact_text(f.colour, f.number), user[f.colour][0], start,
                                        f.colour, f.number)
            said.append(f)
            t = f.end
            continue
        if len(used) == len(fillers):
            used.clear()
        text = rng.choice(fillers)
        while text in used:
            text = rng.choice(fillers)
        used.add(text)
        pcm = speak(text, voice, rate, pitch)
        if not pending and not said and (start + len(pcm)) / sr > spec.duration_s:
            break
        t = put("filler", text, pcm, start)
    n = max(round(spec.duration_s * sr), t + round(spec.pause_s[1] * sr))
    channels = []
    for parts in (left, right):
        x = np.zeros(n, dtype=np.float32)
        for s, pcm in parts:
            x[s:s + len(pcm)] = pcm
        channels.append(x)
    utts.sort(key=lambda u: u.start)
    return Conversation(spec, split, seed, voice, rate, pitch, channels[0], channels[1], tuple(utts),
                        tuple(questions), plan)


def write_conversation(conv: Conversation, wav_path: str | Path) -> Path:
    """The stereo WAV at `wav_path` and its sibling `.json` (alignments + spoken_memory); returns the WAV."""
    wav_path = Path(wav_path)
    write_wav(wav_path, [conv.left, conv.right])
    doc = {"alignments": conv.alignments(), "spoken_memory": conv.record()}
    wav_path.with_suffix(".json").write_text(json.dumps(doc) + "\n")
    return wav_path


def _existing(wav: Path, seed: int, spec: ConversationSpec) -> float | None:
    """The duration of conversation `wav` if it is already on disk as this (seed, spec) would write it (its JSON,
    written after the WAV, names them): generation is deterministic, so a larger set reuses a smaller one's files."""
    try:
        rec = json.loads(wav.with_suffix(".json").read_text())["spoken_memory"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not wav.exists() or rec.get("seed") != seed or rec.get("spec") != json.loads(json.dumps(spec.to_dict())):
        return None
    return rec["duration"]


def write_set(out_dir: str | Path, split: str, n_conversations: int, seed: int, spec: ConversationSpec,
              progress: bool = True) -> Path:
    """`n_conversations` conversations of `split` under `out_dir` (module doc); returns the manifest
    `<out_dir>/<split>.jsonl`, written last (with `<split>.meta.json`). Conversations already there with the same
    seed and spec are kept, not generated again."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: must be one of {SPLITS}")
    if isinstance(n_conversations, bool) or not isinstance(n_conversations, int) or n_conversations < 1:
        raise ValueError(f"n_conversations={n_conversations!r}: must be an integer >= 1")
    out = Path(out_dir)
    (out / split).mkdir(parents=True, exist_ok=True)
    lines = []
    for i in tqdm(range(n_conversations), desc=f"spoken-memory {split}", file=sys.stderr, disable=not progress):
        rel = f"{split}/conv_{i:05d}.wav"
        duration = _existing(out / rel, conversation_seed(seed, split, i), spec)
        if duration is None:
            conv = generate_conversation(spec, conversation_seed(seed, split, i), split)
            write_conversation(conv, out / rel)
            duration = conv.duration
        lines.append(json.dumps({"path": rel, "duration": duration}) + "\n")
    meta = {"format": FORMAT, "split": split, "seed": seed, "n_conversations": n_conversations,
            "spec": spec.to_dict(), "user_voices": list(VOICES[split]), "train_voices": list(TRAIN_VOICES),
            "eval_voices": list(EVAL_VOICES), "moshi_voice": MOSHI_VOICE, "filler_partition": FILLER_PARTITION,
            "filler_sentences": len(filler_sentences(split)), "conversation_seed": "sha256('spoken-memory:"
            "<split>:<seed>:<index>')[:8], big-endian"}
    atomic_write(out / f"{split}.meta.json", lambda p: p.write_text(json.dumps(meta, indent=1) + "\n"))
    return atomic_write(out / f"{split}.jsonl", lambda p: p.write_text("".join(lines)))


LISTEN_KINDS = ("fact", "question")  # the user utterances a listening set transcribes
LISTEN_LAG_S = 0.16  # a transcript starts this long (2 frames) after its utterance has ended


def listening_alignments(record: dict) -> list:
    """The alignments of a listening set: each fact's and question's text, as SPEAKER_MAIN words, starting
    LISTEN_LAG_S after the utterance ends (its audio is all heard before its first text token; a transcript
    lasts as long as its utterance). Moshi's answers and the fillers are not transcribed."""
    return [[u["text"], [round(u["end"] + LISTEN_LAG_S, 6), round(2 * u["end"] - u["start"] + LISTEN_LAG_S, 6)],
             MAIN_SPEAKER] for u in record["utterances"] if u["kind"] in LISTEN_KINDS]


def write_listening_set(source: str | Path, out_dir: str | Path, n_conversations: int) -> Path:
    """A listening set from the first `n_conversations` of the set `source` (a manifest): the same audio
    (symlinked), alignments that transcribe the user (`listening_alignments`) so that a model trained on it
    learns to recognise the user's words before it is asked to remember them. Returns its manifest
    `<out_dir>/<source's name>`; files already there are rewritten (they are cheap)."""
    source = Path(source)
    lines = source.read_text().splitlines()
    if isinstance(n_conversations, bool) or not isinstance(n_conversations, int) or not 1 <= n_conversations <= len(
            lines):
        raise ValueError(f"n_conversations={n_conversations!r}: must be an integer in 1..{len(lines)} "
                         f"(the conversations of {source})")
    out = Path(out_dir)
    kept = []
    for line in lines[:n_conversations]:
        rel = json.loads(line)["path"]
        wav, dst = (source.parent / rel).resolve(), out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        rec = json.loads(wav.with_suffix(".json").read_text())["spoken_memory"]
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        dst.symlink_to(wav)
        doc = {"alignments": listening_alignments(rec), "listening_of": str(wav)}
        atomic_write(dst.with_suffix(".json"), lambda p, doc=doc: p.write_text(json.dumps(doc) + "\n"))
        kept.append(line + "\n")
    return atomic_write(out / source.name, lambda p: p.write_text("".join(kept)))


def _pair(kind: type, name: str) -> Callable[[list[str]], tuple]:
    def parse(values: list[str]) -> tuple:
        if len(values) not in (1, 2):
            raise argparse.ArgumentTypeError(f"--{name} takes 1 or 2 values (min [max]), got {values}")
        try:
            v = [kind(x) for x in values]
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{name}: {values} are not {kind.__name__} values") from None
        return (v[0], v[-1])
    return parse


def main(argv: list[str] | None = None) -> int:
    d = ConversationSpec()
    p = argparse.ArgumentParser(prog="python -m moshi_ttt.experiments.spoken.generate",
                                description="Write a spoken-memory set (docs/spoken-memory.md).")
    p.add_argument("--out", required=True, help="output folder (gets SPLIT.jsonl, SPLIT.meta.json, SPLIT/)")
    p.add_argument("--split", required=True, choices=SPLITS)
    p.add_argument("--n", type=int, required=True, help="number of conversations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--facts", type=int, default=d.facts, help="facts (and questions) per conversation, 1..8")
    p.add_argument("--duration", type=float, default=d.duration_s, help="target seconds per conversation")
    p.add_argument("--min-distance", type=float, default=d.min_distance_s, help="min fact->question seconds")
    p.add_argument("--max-distance", type=float, default=d.max_distance_s, help="max fact->question seconds")
    p.add_argument("--pause", nargs="+", default=None, metavar="S", help=f"pause range, s (default {d.pause_s})")
    p.add_argument("--rate", nargs="+", default=None, metavar="WPM",
                   help=f"user speaking rate, espeak words/min: one value or a range (default {d.rate_wpm})")
    p.add_argument("--pitch", nargs="+", default=None, metavar="P", help=f"user pitch 0..99 (default {d.pitch})")
    p.add_argument("--answer-delay", nargs="+", default=None, metavar="S",
                   help=f"question end -> answer, s (default {d.answer_delay_s})")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        ranges = {f: _pair(k, n)(v) for f, k, n, v in (
            ("pause_s", float, "pause", a.pause), ("rate_wpm", int, "rate", a.rate),
            ("pitch", int, "pitch", a.pitch), ("answer_delay_s", float, "answer-delay", a.answer_delay))
            if v is not None}
        spec = ConversationSpec(facts=a.facts, duration_s=a.duration, min_distance_s=a.min_distance,
                                max_distance_s=a.max_distance, **ranges)
        if a.n < 1:
            raise ValueError(f"--n={a.n}: must be >= 1")
    except (ValueError, argparse.ArgumentTypeError) as e:
        p.error(str(e))
    manifest = write_set(a.out, a.split, a.n, a.seed, spec, progress=not a.no_progress)
    print(manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The spoken-memory benchmark's spec (docs/spoken-memory.md): vocabulary, templates, voices, fillers, records.

A conversation is stereo 24 kHz audio, left = Moshi, right = the user. The user says facts
("the <colour> box holds <number>"), filler sentences and questions ("what does the <colour> box hold");
after each question Moshi says the number alone. Invariants: at most one fact per colour, every fact asked
exactly once and after it, utterances never overlap, user and Moshi never speak at once.
Times are seconds from the start of the file; a question's distance is q_end - fact_end.
Train and eval are disjoint in user voices and in filler sentences (a stable hash splits the grammar).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import math
import re
import typing as tp

from moshi_ttt.utils.validate import Checks, is_number

COLOURS = ("red", "green", "blue", "yellow", "black", "white", "pink", "brown")
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CHANCE = 1 / len(NUMBERS)
FACT_TEMPLATE = "the {colour} box holds {number}"
QUESTION_TEMPLATE = "what does the {colour} box hold"
MAX_LATENCY_S = 3.0  # a right answer's first word comes at most this long after the question's end
MAIN_SPEAKER = "SPEAKER_MAIN"  # the alignments' speaker of Moshi's words (the trainer's default main speaker)
SPLITS = ("train", "eval")
KINDS = ("fact", "question", "answer", "filler")

# espeak-ng voices ("<language>+<variant>"). Eval's accents (Lancaster, West Midlands) never occur in training.
TRAIN_VOICES = ("en+m1", "en+f1", "en-us+m2", "en-us+f2", "en-gb-scotland+m3", "en-gb-scotland+f3", "en-029+m4",
                "en-029+f4", "en-us-nyc+m5", "en-us-nyc+f5", "en-gb-x-rp+m6", "en-gb-x-rp+f2")
EVAL_VOICES = ("en-gb-x-gbclan+m2", "en-gb-x-gbclan+f4", "en-gb-x-gbcwmd+m8", "en-gb-x-gbcwmd+f5")
MOSHI_VOICE = "en-us+m7"  # every answer of every split, at espeak's default rate and pitch
VOICES = {"train": TRAIN_VOICES, "eval": EVAL_VOICES}

# Filler grammar "subject verb object place": 12^4 sentences. No word of it is, contains or sounds like a
# colour, a number, "box" or "hold" (checked by `forbidden_in`).
FILLER_GRAMMAR = {
    "subject": ("the cat", "my uncle", "a tall man", "the nurse", "our teacher", "the little girl", "a farmer",
                "the doctor", "her cousin", "the baker", "a sailor", "the old lady"),
    "verb": ("visited", "cleaned", "painted", "carried", "watched", "cooked", "opened", "followed", "washed",
             "moved", "found", "sketched"),
    "object": ("the kitchen", "a small garden", "the old bicycle", "the wooden chair", "a paper kite",
               "the front door", "a big umbrella", "the little boat", "a new lamp", "the picture frame",
               "a warm jacket", "the heavy table"),
    "place": ("in the morning", "after lunch", "near the river", "in the rain", "at the station",
              "under the bridge", "very slowly", "with great care", "on a cold day", "behind the house",
              "last summer", "at night"),
}
EVAL_FILLER_SHARE = 5  # a sentence is eval's iff the first byte of its sha256 is divisible by this
FILLER_PARTITION = ("sha256(sentence as UTF-8)[0] % 5 == 0 -> eval, else train; sentences = every "
                    "'subject verb object place' of FILLER_GRAMMAR")
_FORBIDDEN_PARTS = (*COLOURS, *NUMBERS, "box", "hold")
_SOUND_ALIKES = ("to", "too", "for", "fore", "won", "ate", "read", "blew", "hole", "whole", "tree", "sicks")


def forbidden_in(sentence: str) -> list[str]:
    """The words of `sentence` that are, contain or sound like a colour, a number, "box" or "hold"."""
    words = re.findall(r"[a-z]+", sentence.lower())
    return [w for w in words if w in _SOUND_ALIKES or any(p in w for p in _FORBIDDEN_PARTS)]


def filler_split(sentence: str) -> str:
    """"eval" or "train": the stable partition of filler sentences (FILLER_PARTITION)."""
    return "eval" if hashlib.sha256(sentence.encode()).digest()[0] % EVAL_FILLER_SHARE == 0 else "train"


@functools.cache
def filler_sentences(split: str) -> tuple[str, ...]:
    """Every filler sentence of `split`, in grammar order (disjoint between the splits)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: must be one of {SPLITS}")
    every = (" ".join(p) for p in itertools.product(*FILLER_GRAMMAR.values()))
    return tuple(s for s in every if filler_split(s) == split)


def fact_text(colour: str, number: str) -> str:
    return FACT_TEMPLATE.format(colour=colour, number=number)


def question_text(colour: str) -> str:
    return QUESTION_TEMPLATE.format(colour=colour)


_CHECK = Checks("conversation spec")


def _range(field: str, v: tp.Any, lo: float, hi: float, integer: bool = False) -> None:
    """`v` is a pair (a, b) with lo <= a <= b <= hi."""
    ok = isinstance(v, tuple) and len(v) == 2 and all(
        (isinstance(x, int) and not isinstance(x, bool)) if integer else is_number(x) for x in v)
    if not ok:
        raise _CHECK.error(field, v, f"must be a pair ({'integers' if integer else 'numbers'}) (min, max)")
    if not lo <= v[0] <= v[1] <= hi:
        raise _CHECK.error(field, v, f"must satisfy {lo} <= min <= max <= {hi}")


@dataclasses.dataclass(frozen=True)
class ConversationSpec:
    """One conversation's shape. Ranges are (min, max) pairs; min == max fixes the value.

    facts: facts (and questions) per conversation, distinct colours; duration_s: target length (a
    conversation runs longer only to ask a question still due); min/max_distance_s: the range of the target
    fact->question distances (capped at duration_s - OVERHEAD_S); pause_s: silence between utterances;
    rate_wpm / pitch: the user's espeak speed and pitch, drawn once per conversation; answer_delay_s: from
    the question's end to Moshi's answer.
    """

    facts: int = 4
    duration_s: float = 60.0
    min_distance_s: float = 2.0
    max_distance_s: float = 50.0
    pause_s: tuple[float, float] = (0.3, 1.0)
    rate_wpm: tuple[int, int] = (150, 190)
    pitch: tuple[int, int] = (30, 70)
    answer_delay_s: tuple[float, float] = (0.2, 0.5)

    OVERHEAD_S: tp.ClassVar[float] = 4.0  # a fact before the distance, an answer after it, pauses

    def __post_init__(self) -> None:
        _CHECK.number("facts", self.facts, lo=1, integer=True)
        if self.facts > len(COLOURS):
            raise _CHECK.error("facts", self.facts, f"must be <= {len(COLOURS)} (one fact per colour)")
        _CHECK.number("duration_s", self.duration_s, lo=0, lo_open=True)
        _CHECK.number("min_distance_s", self.min_distance_s, lo=0, lo_open=True)
        _CHECK.number("max_distance_s", self.max_distance_s, lo=self.min_distance_s)
        if self.duration_s < self.min_distance_s + self.OVERHEAD_S:
            raise _CHECK.error("duration_s", self.duration_s, f"must be >= min_distance_s + {self.OVERHEAD_S} "
                               f"= {self.min_distance_s + self.OVERHEAD_S}")
        _range("pause_s", self.pause_s, 0.0, 10.0)
        _range("rate_wpm", self.rate_wpm, 80, 450, integer=True)
        _range("pitch", self.pitch, 0, 99, integer=True)
        _range("answer_delay_s", self.answer_delay_s, 0.0, 2.0)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: tp.Mapping) -> ConversationSpec:
        return _CHECK.build(cls, d, "conversation spec")


def _time(field: str, v: tp.Any, kind: str) -> None:
    if not is_number(v) or v < 0:
        raise Checks(kind).error(field, v, "must be a number of seconds >= 0")


def _from(cls: type, d: tp.Any, kind: str) -> tp.Any:
    checks = Checks(kind)
    checks.mapping(cls, d, kind)
    missing = sorted({f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING} - set(d))
    if missing:
        raise ValueError(f"invalid {kind}: missing key(s) {missing} in {d!r}")
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class Utterance:
    """One utterance: `speaker` "user" (right channel) or "moshi" (left: the answers only)."""

    kind: str
    speaker: str
    text: str
    start: float
    end: float
    colour: str | None = None
    number: str | None = None

    def __post_init__(self) -> None:
        c = Checks("utterance")
        c.choice("kind", self.kind, KINDS)
        c.choice("speaker", self.speaker, ("moshi",) if self.kind == "answer" else ("user",))
        _time("start", self.start, "utterance")
        _time("end", self.end, "utterance")
        if self.end <= self.start:
            raise c.error("end", self.end, f"must be > start={self.start}")
        c.choice("colour", self.colour, COLOURS, optional=self.kind == "filler")
        if self.kind == "filler" and self.colour is not None:
            raise c.error("colour", self.colour, "a filler has no colour")
        c.choice("number", self.number, NUMBERS, optional=self.kind in ("filler", "question"))
        if self.kind in ("filler", "question") and self.number is not None:
            raise c.error("number", self.number, f"a {self.kind} has no number")
        want = {"fact": lambda: fact_text(self.colour, self.number), "question": lambda: question_text(self.colour),
                "answer": lambda: self.number}.get(self.kind)
        if want is not None and self.text != want():
            raise c.error("text", self.text, f"a {self.kind} says {want()!r}")
        if self.kind == "filler" and forbidden_in(self.text):
            raise c.error("text", self.text, f"a filler may not say {forbidden_in(self.text)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: tp.Mapping) -> Utterance:
        return _from(cls, d, "utterance")


@dataclasses.dataclass(frozen=True)
class Question:
    """A question and its ground truth: the fact it asks about, its own span, Moshi's reference answer span,
    and distance = q_end - fact_end (seconds)."""

    colour: str
    answer: str
    fact_start: float
    fact_end: float
    q_start: float
    q_end: float
    answer_start: float
    answer_end: float
    distance: float

    def __post_init__(self) -> None:
        c = Checks("question")
        c.choice("colour", self.colour, COLOURS)
        c.choice("answer", self.answer, NUMBERS)
        for f in ("fact_start", "fact_end", "q_start", "q_end", "answer_start", "answer_end"):
            _time(f, getattr(self, f), "question")
        order = ("fact_start", "fact_end", "q_start", "q_end", "answer_start", "answer_end")
        for a, b in itertools.pairwise(order):
            if getattr(self, b) < getattr(self, a):
                raise c.error(b, getattr(self, b), f"must be >= {a}={getattr(self, a)}")
        if not is_number(self.distance) or not math.isclose(self.distance, self.q_end - self.fact_end, abs_tol=1e-5):
            raise c.error("distance", self.distance, f"must be q_end - fact_end = {self.q_end - self.fact_end}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: tp.Mapping) -> Question:
        return _from(cls, d, "question")
